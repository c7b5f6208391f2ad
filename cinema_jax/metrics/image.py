"""Image-quality metrics for denoising, numpy (host side): PSNR, SSIM on complex magnitude, CNR without targets.

Conventions follow the SNRAware reference: PSNR = 10 log10(range^2 / MSE) with a fixed range (the reference uses
2048 on SNR-unit images) or, when `data_range` is None, the max |target| of each sample (what we report for the
phantom, whose clean intensity depends on the drawn SNR); SSIM is computed per 2-D frame on the magnitude with an
11 x 11 uniform window, K1 = 0.01, K2 = 0.03 and, when `data_range` is None, the data range max(range(pred),
range(target)) (torchmetrics' default that the reference relies on), averaged over the valid (unpadded) window
positions and then over frames. Arrays: (X, Y[, T]) magnitude or complex; a trailing channel axis of 2 is
read as (real, imag) when `channels_last_complex`.
"""

from __future__ import annotations

import numpy as np


def magnitude(x: np.ndarray, channels_last_complex: bool = False) -> np.ndarray:
    """|x| for complex input or (..., 2) real/imag channels; real input is returned as abs."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.abs(x).astype(np.float64)
    if channels_last_complex:
        return np.sqrt(x[..., 0].astype(np.float64) ** 2 + x[..., 1].astype(np.float64) ** 2)
    return np.abs(x).astype(np.float64)


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """PSNR (dB) of `pred` vs `target` (same shape, real arrays, e.g. magnitudes). data_range None = max |target|."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {target.shape}")
    rng = float(np.max(np.abs(target))) if data_range is None else float(data_range)
    mse = float(np.mean((pred - target) ** 2)) + np.finfo(np.float32).eps
    return float(10.0 * np.log10(rng * rng / mse))


def _box_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over every valid w x w window of the first two axes (summed-area table)."""
    c = np.cumsum(np.cumsum(x, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))
    s = c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]
    return s / (w * w)


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float | None = None, window: int = 11,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM over 2-D frames of real images (X, Y[, T]) (magnitudes); see module docstring for conventions."""
    x, y = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    x, y = x.reshape(x.shape[0], x.shape[1], -1), y.reshape(y.shape[0], y.shape[1], -1)
    w = min(window, x.shape[0], x.shape[1])
    if data_range is None:
        data_range = max(float(x.max() - x.min()), float(y.max() - y.min()))
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = _box_mean(x, w), _box_mean(y, w)
    n = w * w
    unbias = n / (n - 1) if n > 1 else 1.0
    vx = (_box_mean(x * x, w) - mx * mx) * unbias
    vy = (_box_mean(y * y, w) - my * my) * unbias
    cxy = (_box_mean(x * y, w) - mx * my) * unbias
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(np.mean(s.mean(axis=(0, 1))))


def cnr(image: np.ndarray, roi_a: np.ndarray, roi_b: np.ndarray, noise_roi: np.ndarray | None = None) -> float:
    """Contrast-to-noise ratio |mean(a) - mean(b)| / noise std, for data without a clean target.

    image: real (X, Y[, T]) (magnitude); roi_*: boolean masks of the same shape. Noise std comes from
    `noise_roi` when given, else from the pooled std of the two ROIs (flat tissue assumed). Comparing CNR before
    and after denoising on the same ROIs gives the reference's "CNR improvement".
    """
    im = np.asarray(image, np.float64)
    a, b = im[np.asarray(roi_a, bool)], im[np.asarray(roi_b, bool)]
    if a.size < 2 or b.size < 2:
        raise ValueError("each ROI needs at least 2 pixels")
    if noise_roi is not None:
        sd = float(np.std(im[np.asarray(noise_roi, bool)]))
    else:
        sd = float(np.sqrt(0.5 * (np.var(a) + np.var(b))))
    return float(abs(a.mean() - b.mean()) / max(sd, 1e-12))


def temporal_noise_std(series: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Noise proxy for a cine without a target: median over pixels of the std of frame-to-frame differences / sqrt(2).

    series: (X, Y, T) real. Static tissue contributes only noise; moving structures inflate a minority of pixels,
    which the median ignores.
    """
    s = np.asarray(series, np.float64)
    d = np.diff(s, axis=-1).std(axis=-1) / np.sqrt(2.0)
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    return float(np.median(d))
