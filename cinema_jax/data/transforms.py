"""Per-sample numpy transforms of the CineMA pretraining recipe: crop/pad to size, min-max scaling, random zoom.

Why here and numpy-only: they run inside Grain workers (no jax in `cinema_jax/data`), and every random draw comes
from the `np.random.Generator` Grain seeds per record, so a resumed or re-sharded run sees identical samples.
Reference semantics (../shared/docs/cinema.md §2): `RandZoomd(prob=0.5)` with MONAI's default zoom range 0.9-1.1,
one isotropic factor (z included for SAX), size kept by centre crop / zero pad, trilinear for SAX and bicubic for
LAX; then `ScaleIntensityd` to [0, 1]; SAX slices are zero-padded at the END to the patch size (16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def crop_or_pad(array: np.ndarray, size: Sequence[int], mode: str = "center", value: float = 0.0) -> np.ndarray:
    """Crop or zero-pad the leading len(size) axes to `size`; `mode` 'center' (symmetric) or 'end' (pad/crop at
    the end only, as MONAI `SpatialPadd(method='end')`). Trailing axes (channels) are untouched."""
    if mode not in ("center", "end"):
        raise ValueError(f"mode must be 'center' or 'end', got {mode!r}")
    out = array
    for axis, target in enumerate(size):
        n = out.shape[axis]
        target = int(target)
        if n > target:
            start = (n - target) // 2 if mode == "center" else 0
            out = np.take(out, np.arange(start, start + target), axis=axis)
        elif n < target:
            before = (target - n) // 2 if mode == "center" else 0
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, target - n - before)
            out = np.pad(out, pad, constant_values=value)
    return out


def pad_end(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Zero-pad at the end (never crop) of the leading axes up to `size` (SAX slices -> 16)."""
    pad = [(0, max(int(t) - n, 0)) for n, t in zip(array.shape, size)]
    pad += [(0, 0)] * (array.ndim - len(pad))
    return np.pad(array, pad) if any(p[1] for p in pad) else array


def minmax_scale(array: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Scale to [0, 1] by the array's own min and max (MONAI ScaleIntensity); a constant array becomes zeros."""
    array = np.asarray(array, np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi - lo < eps:
        return np.zeros_like(array)
    return ((array - lo) / (hi - lo)).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights of the taps at offsets -1, 0, 1, 2 from floor(x), for t = x - floor(x)."""
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _axis_taps(n_in: int, n_out: int, keep: slice, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (rows: the output samples in `keep`) of a 1-D resize from n_in to n_out samples,
    half-pixel centres (torch `interpolate`, align_corners=False: linear clamps the source coordinate at 0, cubic
    clamps the taps at the edges)."""
    dst = np.arange(n_out, dtype=np.float64)[keep]
    src = (dst + 0.5) * (n_in / n_out) - 0.5
    if order == 1:
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        idx, w = np.stack([i0, i0 + 1], -1), np.stack([1 - t, t], -1)
    elif order == 3:
        i0 = np.floor(src).astype(np.int64)
        idx, w = i0[:, None] + np.arange(-1, 3), _cubic_weights(src - i0)
    else:
        raise ValueError(f"zoom order must be 1 (linear) or 3 (cubic), got {order}")
    return np.clip(idx, 0, n_in - 1), w.astype(np.float32)


def zoom_keep_size(array: np.ndarray, factor: float, order: int) -> np.ndarray:
    """Isotropic zoom of all axes by `factor`, then centre crop / zero pad back to the input shape.

    The reference's MONAI `Zoom` (keep_size, zero padding): torch `interpolate` to floor(n * factor) samples per
    axis (linear for order 1, Keys cubic a = -0.75 for order 3, half-pixel centres), then `ResizeWithPadOrCrop`.
    Separable, and only the output samples that survive the crop are computed; an axis whose size does not change
    (factor within 1/n of 1 above it) is left as is, as torch does.
    """
    out = np.asarray(array, np.float32)
    for axis, n_in in enumerate(array.shape):
        n_out = max(int(np.floor(n_in * float(factor))), 1)
        if n_out == n_in:
            continue  # scale 1: the identity
        start = n_out // 2 - n_in // 2 if n_out > n_in else 0  # MONAI CenterSpatialCrop's window
        idx, w = _axis_taps(n_in, n_out, slice(start, start + min(n_in, n_out)), order)
        shape = [1] * out.ndim
        shape[axis] = len(idx)
        acc = np.take(out, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
        for k in range(1, idx.shape[1]):
            acc += np.take(out, idx[:, k], axis=axis) * w[:, k].reshape(shape)
        out = acc
    return crop_or_pad(out, array.shape, mode="center").astype(np.float32, copy=False)


def random_zoom(array: np.ndarray, rng: np.random.Generator, prob: float = 0.5,
                zoom_range: tuple[float, float] = (0.9, 1.1), order: int | None = None) -> np.ndarray:
    """With probability `prob`, zoom by one factor drawn uniformly in `zoom_range` (all spatial axes, size kept).

    Two draws are always made (apply?, factor) so the rng stream does not depend on the outcome. `order` defaults
    to 1 (trilinear) for 3-D and 3 (bicubic) for 2-D arrays, as the reference.
    """
    apply = rng.random() < prob
    factor = float(rng.uniform(zoom_range[0], zoom_range[1]))
    if not apply:
        return np.asarray(array, np.float32)
    if order is None:
        order = 1 if array.ndim >= 3 else 3
    return zoom_keep_size(array, factor, order)
