"""Chen et al. 2019 normalisation and augmentation for cine CMR, as per-record deterministic numpy transforms.

Why: a segmenter trained on one scanner generalises to others when training sees the same anatomy under many
geometries and intensity profiles (Chen 2020, Front. Cardiovasc. Med. 7:105; parameters in ../shared/docs/chen2019.md
A.4-A.5). Every random draw comes from the `np.random.Generator` passed in (Grain seeds it per record), so a sample
is a pure function of (seed, record index): resume-exact and worker-count invariant. numpy + scipy only.

Layouts: images (X, Y) for LAX or (X, Y, Z) for SAX, x first; spatial augmentation acts in-plane (axes 0, 1) with the
same transform on every slice; labels (same shape, ints) are always warped with nearest interpolation by the same
transform; landmarks (K, 2) pixel (x, y) follow the transform exactly (elastic inverted by fixed-point iteration).

Pipeline (`chen_pipeline`): in-plane resample to `target_spacing` mm (linear image / nearest label) -> crop/pad to
`crop_size` (centred, or random when `random_crop`) -> [train only] intensity + spatial augmentation -> per-slice
z-score (default, Chen's recommendation) or min-max to [0, 1] after percentile clipping.

Config (a mapping; missing keys take `DEFAULTS`): `<op>_prob` probabilities and the ranges below. Defaults follow the
UKBB_advanced policy (flip 0.5, rotation +-180 deg, scale 0.7-1.4 per axis, shift +-10 %, elastic 0.5,
brightness/contrast 0.5) plus the later additions of the CineMA/AdvChain line (gamma, bias field, Gaussian/Rician
noise, low-resolution and thick-slice simulation) at modest probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

DEFAULTS: dict[str, Any] = dict(
    # preprocessing
    target_spacing=1.25,  # mm in-plane; None/0 keeps the input grid
    crop_size=None,  # (X, Y) pixels after resampling; None keeps the resampled size
    random_crop=False,  # train only: random crop position instead of centred
    normalise="zscore",  # 'zscore' (per slice) | 'minmax' (per slice, after percentile clipping) | 'none'
    minmax_percentiles=(1.0, 99.0),
    # spatial (in-plane)
    flip_prob=0.5,  # each of x and y, independently
    rotate_prob=0.5, rotate_deg=180.0,  # uniform in [-rotate_deg, +rotate_deg]
    scale_prob=0.5, scale_range=(0.7, 1.4),  # zoom per axis, drawn independently (anisotropic)
    translate_prob=0.5, translate_frac=0.1,  # shift uniform in +-frac of the side
    elastic_prob=0.5, elastic_alpha=(1.5, 2.0), elastic_sigma=(0.075, 0.15),  # x side in pixels (Simard)
    # intensity
    contrast_prob=0.5, contrast_range=(0.8, 1.2), brightness_range=(-0.1, 0.1),  # x*c + b*range, clipped
    gamma_prob=0.3, gamma_range=(0.7, 1.5),
    bias_prob=0.3, bias_strength=(0.0, 0.4),  # max |log-gain| of a smooth quadratic field
    noise_prob=0.3, noise_std=(0.0, 0.05), rician_prob=0.5,  # std relative to the image's intensity range
    lowres_prob=0.2, lowres_factor=(1.0, 2.5),  # in-plane down/up-sampling factor
    thick_slice_prob=0.2, thick_slice_sigma=(0.3, 1.0),  # SAX: Gaussian blur sigma along z (slices); LAX: along y
)

SPATIAL_OPS = ("flip", "rotate", "scale", "translate", "elastic")
INTENSITY_OPS = ("contrast", "gamma", "bias", "noise", "lowres", "thick_slice")


def merge_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS overridden by `cfg` (a dict or ConfigDict); unknown keys raise ValueError naming the key."""
    out = dict(DEFAULTS)
    if cfg is None:
        return out
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(k for k in items if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; known: {sorted(DEFAULTS)}")
    out.update(items)
    return out


def no_augmentation(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`cfg` with every augmentation probability set to 0 (preprocessing kept): the 'without Chen' baseline."""
    out = merge_config(cfg)
    for op in SPATIAL_OPS + INTENSITY_OPS:
        out[f"{op}_prob"] = 0.0
    out["rician_prob"] = 0.0
    return out


# ============================================================================================== preprocessing
def resample_inplane(array: np.ndarray, spacing: Sequence[float], target: float | None, order: int) -> np.ndarray:
    """Resample axes 0, 1 from `spacing[:2]` mm to `target` mm (order 1 image, 0 label); z and beyond untouched.

    The field of view's outer edges stay aligned (voxel centre i' maps to (i' + 0.5) * t / s - 0.5).
    """
    if not target:
        return np.asarray(array)
    scale = np.array([float(target) / float(spacing[0]), float(target) / float(spacing[1])])
    if np.allclose(scale, 1.0):
        return np.asarray(array)
    shape = tuple(max(1, int(round(n / s))) for n, s in zip(array.shape[:2], scale))
    cx = (np.arange(shape[0]) + 0.5) * scale[0] - 0.5
    cy = (np.arange(shape[1]) + 0.5) * scale[1] - 0.5
    gx, gy = np.meshgrid(cx, cy, indexing="ij")
    return _warp_inplane(array, gx, gy, order)


def crop_or_pad(array: np.ndarray, size: Sequence[int], start: Sequence[int] | None = None,
                fill: float = 0.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop / zero-pad axes 0, 1 to `size`; `start` = top-left in input pixels (may be negative; default centred).

    Returns (array, start) so the same window can be applied to labels, landmarks, or undone at inference.
    """
    size = (int(size[0]), int(size[1]))
    if start is None:
        start = tuple((n - s) // 2 for n, s in zip(array.shape[:2], size))
    start = (int(start[0]), int(start[1]))
    out = np.full(size + array.shape[2:], fill, array.dtype)
    src, dst = [], []
    for a in range(2):
        lo, hi = max(start[a], 0), min(start[a] + size[a], array.shape[a])
        if hi <= lo:
            return out, start
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[a], hi - start[a]))
    out[dst[0], dst[1]] = array[src[0], src[1]]
    return out, start


def _per_slice(image: np.ndarray, fn) -> np.ndarray:
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        return fn(img).astype(np.float32)
    flat = img.reshape(img.shape[:2] + (-1,))
    return np.stack([fn(flat[..., k]) for k in range(flat.shape[-1])], -1).reshape(img.shape).astype(np.float32)


def zscore_per_slice(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Subtract each 2-D slice's mean and divide by its std; constant (e.g. padded) slices become 0."""
    def fn(s):
        sd = float(s.std())
        return (s - s.mean()) / sd if sd > eps else np.zeros_like(s)
    return _per_slice(image, fn)


def minmax_per_slice(image: np.ndarray, percentiles: Sequence[float] = (1.0, 99.0)) -> np.ndarray:
    """Clip each 2-D slice to its [p_lo, p_hi] percentiles and scale to [0, 1]; constant slices become 0."""
    def fn(s):
        lo, hi = np.percentile(s, percentiles)
        return (np.clip(s, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return _per_slice(image, fn)


def normalise(image: np.ndarray, cfg: Mapping[str, Any]) -> np.ndarray:
    mode = cfg.get("normalise", "zscore")
    if mode == "zscore":
        return zscore_per_slice(image)
    if mode == "minmax":
        return minmax_per_slice(image, cfg.get("minmax_percentiles", (1.0, 99.0)))
    if mode in ("none", None):
        return np.asarray(image, np.float32)
    raise ValueError(f"normalise must be 'zscore', 'minmax' or 'none', got {mode!r}")


# ============================================================================================== spatial
def _warp_inplane(array: np.ndarray, gx: np.ndarray, gy: np.ndarray, order: int, fill: float = 0.0) -> np.ndarray:
    """Sample every (X, Y) slice of `array` at input coordinates (gx, gy) (output-shaped); constant `fill` outside."""
    arr = np.asarray(array)
    coords = np.stack([gx, gy])
    out_dtype = arr.dtype if order == 0 else np.float32
    src = arr if order == 0 else arr.astype(np.float32)
    if arr.ndim == 2:
        return ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=fill).astype(out_dtype)
    flat = src.reshape(arr.shape[:2] + (-1,))
    out = np.stack([ndimage.map_coordinates(flat[..., k], coords, order=order, mode="constant", cval=fill)
                    for k in range(flat.shape[-1])], -1)
    return out.reshape(gx.shape + arr.shape[2:]).astype(out_dtype)


def sample_spatial(rng: np.random.Generator, shape: Sequence[int], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one in-plane transform: output pixel p samples input A @ (p - c) + c + t (+ elastic d(p)).

    Returns {'matrix' (2, 2), 'shift' (2,), 'dx', 'dy' (X, Y) or None}; the draw order is fixed so the same rng state
    gives the same transform.
    """
    nx, ny = int(shape[0]), int(shape[1])
    m = np.eye(2)
    if rng.random() < cfg["flip_prob"]:
        m = m @ np.diag([-1.0, 1.0])
    if rng.random() < cfg["flip_prob"]:
        m = m @ np.diag([1.0, -1.0])
    if rng.random() < cfg["rotate_prob"]:
        a = math.radians(rng.uniform(-cfg["rotate_deg"], cfg["rotate_deg"]))
        m = m @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    if rng.random() < cfg["scale_prob"]:
        zoom = rng.uniform(*cfg["scale_range"], size=2)  # zoom > 1 enlarges the content -> sample a smaller area
        m = m @ np.diag(1.0 / zoom)
    shift = np.zeros(2)
    if rng.random() < cfg["translate_prob"]:
        f = float(cfg["translate_frac"])
        shift = rng.uniform(-f, f, size=2) * np.array([nx, ny])
    dx = dy = None
    if rng.random() < cfg["elastic_prob"]:
        side = float(max(nx, ny))
        alpha = side * rng.uniform(*cfg["elastic_alpha"])
        sigma = side * rng.uniform(*cfg["elastic_sigma"])
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (nx, ny)), sigma, mode="constant") * alpha
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (nx, ny)), sigma, mode="constant") * alpha
    return {"matrix": m, "shift": shift, "dx": dx, "dy": dy}


def _transform_grid(tf: Mapping[str, Any], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    nx, ny = int(shape[0]), int(shape[1])
    c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    px, py = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij")
    if tf.get("dx") is not None:
        px, py = px + tf["dx"], py + tf["dy"]
    m, t = tf["matrix"], tf["shift"]
    gx = m[0, 0] * (px - c[0]) + m[0, 1] * (py - c[1]) + c[0] + t[0]
    gy = m[1, 0] * (px - c[0]) + m[1, 1] * (py - c[1]) + c[1] + t[1]
    return gx, gy


def _transform_points(tf: Mapping[str, Any], points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Forward-map (K, 2) input pixel (x, y) points: solve A (p + d(p) - c) + c + t = q for the output p."""
    nx, ny = int(shape[0]), int(shape[1])
    c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    q = np.asarray(points, np.float64).reshape(-1, 2)
    inv = np.linalg.inv(tf["matrix"])
    base = (q - c - tf["shift"]) @ inv.T + c
    if tf.get("dx") is None:
        return base
    p = base.copy()
    for _ in range(20):  # the smooth field is a contraction for the ranges used, so this converges quickly
        d = np.stack([ndimage.map_coordinates(tf[k], p.T, order=1, mode="nearest") for k in ("dx", "dy")], -1)
        p = base - d
    return p


def apply_spatial(tf: Mapping[str, Any], image: np.ndarray, label: np.ndarray | None = None,
                  points: np.ndarray | None = None):
    """Apply a transform from `sample_spatial` to image (linear), label (nearest) and points (exact)."""
    gx, gy = _transform_grid(tf, image.shape[:2])
    img = _warp_inplane(image, gx, gy, 1)
    lab = None if label is None else _warp_inplane(label, gx, gy, 0)
    pts = None if points is None else _transform_points(tf, points, image.shape[:2]).astype(np.float32)
    return img, lab, pts


# ============================================================================================== intensity
def _quadratic_field(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Smooth in-plane field in [-1, 1] (random 2nd-order polynomial), broadcastable to (X, Y[, Z])."""
    nx, ny = int(shape[0]), int(shape[1])
    x = np.linspace(-1, 1, nx)[:, None]
    y = np.linspace(-1, 1, ny)[None, :]
    c = rng.uniform(-1, 1, 6)
    f = c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y + c[5]
    f = f / max(float(np.abs(f).max()), 1e-6)
    return f.reshape((nx, ny) + (1,) * (len(shape) - 2))


def apply_intensity(image: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any]) -> np.ndarray:
    """Contrast/brightness, gamma, bias field, low resolution, thick slices, then Gaussian or Rician noise.

    Works on any non-negative-ish intensity scale: ranges are relative to the image's own [min, max].
    """
    img = np.asarray(image, np.float32)
    lo, hi = float(img.min()), float(img.max())
    span = hi - lo
    if span <= 0:
        return img.copy()
    out = img.copy()
    if rng.random() < cfg["contrast_prob"]:
        c = rng.uniform(*cfg["contrast_range"])
        b = rng.uniform(*cfg["brightness_range"]) * span
        mean = float(out.mean())
        out = np.clip((out - mean) * c + mean + b, lo, hi)
    if rng.random() < cfg["gamma_prob"]:
        g = rng.uniform(*cfg["gamma_range"])
        out = lo + span * np.clip((out - lo) / span, 0, 1) ** g
    if rng.random() < cfg["bias_prob"]:
        strength = rng.uniform(*cfg["bias_strength"])
        out = out * np.exp(strength * _quadratic_field(rng, out.shape)).astype(np.float32)
    if rng.random() < cfg["lowres_prob"]:
        f = rng.uniform(*cfg["lowres_factor"])
        if f > 1.01:
            small = tuple(max(2, int(round(n / f))) for n in out.shape[:2])
            zoom_dn = [s / n for s, n in zip(small, out.shape[:2])] + [1.0] * (out.ndim - 2)
            down = ndimage.zoom(out, zoom_dn, order=1, mode="nearest", grid_mode=True)
            zoom_up = [n / s for s, n in zip(down.shape[:2], out.shape[:2])] + [1.0] * (out.ndim - 2)
            up = ndimage.zoom(down, zoom_up, order=1, mode="nearest", grid_mode=True)
            fixed, _ = crop_or_pad(up, out.shape[:2], start=(0, 0))
            out = fixed
    if rng.random() < cfg["thick_slice_prob"]:
        s = rng.uniform(*cfg["thick_slice_sigma"])
        axis = 2 if out.ndim >= 3 else 1
        out = ndimage.gaussian_filter1d(out, s * (1.0 if out.ndim >= 3 else 2.0), axis=axis, mode="nearest")
    if rng.random() < cfg["noise_prob"]:
        sd = rng.uniform(*cfg["noise_std"]) * span
        if rng.random() < cfg["rician_prob"]:
            base = np.clip(out - lo, 0, None)
            n1 = rng.normal(0, sd, out.shape)
            n2 = rng.normal(0, sd, out.shape)
            out = lo + np.sqrt((base + n1) ** 2 + n2 ** 2)
        else:
            out = out + rng.normal(0, sd, out.shape)
    return out.astype(np.float32)


# ============================================================================================== pipeline
def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, cfg: Mapping[str, Any] | None,
            points: np.ndarray | None = None):
    """Intensity then spatial augmentation of one sample (no preprocessing, no normalisation).

    image (X, Y[, Z]) float, label same shape ints or None, points (K, 2) or None -> same types, same shapes.
    """
    cfg = merge_config(cfg)
    img = apply_intensity(image, rng, cfg)
    tf = sample_spatial(rng, img.shape[:2], cfg)
    return apply_spatial(tf, img, label, points)


def chen_pipeline(image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], rng: np.random.Generator,
                  cfg: Mapping[str, Any] | None, train: bool, points: np.ndarray | None = None) -> dict[str, Any]:
    """Resample in-plane -> crop/pad -> [augment if train] -> normalise, for one 2-D or 3-D sample.

    spacing: mm per axis (at least x, y). Returns {'image' float32, 'label' (same dtype as input) or None,
    'points' (K, 2) float32 or None, 'spacing' tuple (mm after resampling), 'crop_start' (x, y) in resampled pixels}.
    """
    cfg = merge_config(cfg)
    image = np.asarray(image, np.float32)
    target = cfg["target_spacing"]
    spacing = tuple(float(s) for s in spacing)
    img = resample_inplane(image, spacing, target, 1)
    lab = None if label is None else resample_inplane(np.asarray(label), spacing, target, 0)
    pts = None
    new_spacing = spacing
    if target:
        new_spacing = (float(target), float(target)) + spacing[2:]
        if points is not None:  # edge-aligned resampling: p' = (p + 0.5) * s / t - 0.5
            pts = (np.asarray(points, np.float64) + 0.5) * np.array(spacing[:2]) / float(target) - 0.5
    if pts is None and points is not None:
        pts = np.asarray(points, np.float64)
    start = (0, 0)
    if cfg["crop_size"] is not None:
        size = tuple(int(s) for s in cfg["crop_size"])
        start = None
        if train and cfg["random_crop"]:
            start = tuple(int(rng.integers(min(0, n - s), max(0, n - s) + 1)) for n, s in zip(img.shape[:2], size))
        img, start = crop_or_pad(img, size, start)
        if lab is not None:
            lab, _ = crop_or_pad(lab, size, start)
        if pts is not None:
            pts = pts - np.array(start)
    if train:
        img, lab, pts = augment(img, lab, rng, cfg, pts)
    img = normalise(img, cfg)
    return {"image": img, "label": lab, "points": None if pts is None else np.asarray(pts, np.float32),
            "spacing": new_spacing, "crop_start": start}
