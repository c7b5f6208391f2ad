"""Segmentation metrics per structure: Dice and HD95 in millimetres (numpy / scipy).

Why our own: the reference uses MONAI (Dice, 95th-percentile symmetric Hausdorff distance on surface voxels, in mm
through the voxel spacing); this reproduces that definition without torch. Arrays are integer label maps (X, Y[, Z])
in ACDC order (0 BG, 1 RV, 2 MYO, 3 LV); `spacing` is mm per axis (x, y[, z]).

Empty conventions: Dice of two empty masks = 1 (nothing to find, nothing found); HD95 is NaN when either mask is
empty (undefined distance) so means use `np.nanmean`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

ACDC_CLASSES: dict[str, int] = {"RV": 1, "MYO": 2, "LV": 3}


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Dice = 2 |A n B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / denom)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with at least one face-neighbour outside (image border counts as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of `a` to the nearest surface voxel of `b`."""
    sa, sb = _surface(np.asarray(a, bool)), _surface(np.asarray(b, bool))
    dt = ndimage.distance_transform_edt(~sb, sampling=tuple(float(s) for s in spacing[: a.ndim]))
    return dt[sa]


def hausdorff95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing: Sequence[float],
                percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance (mm): max of the two directed 95th-percentile surface distances."""
    a, b = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if len(spacing) < a.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has fewer entries than mask dims {a.ndim}")
    if not a.any() or not b.any():
        return float("nan")
    d_ab = surface_distances(a, b, spacing)
    d_ba = surface_distances(b, a, spacing)
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def segmentation_metrics(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None,
                         classes: Mapping[str, int] = ACDC_CLASSES, hd: bool = True) -> dict[str, float]:
    """Per-structure `dice_<NAME>` and (with spacing and `hd`) `hd95_<NAME>` (mm), plus `mean_dice` / `mean_hd95`
    over the structures (NaN-aware)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {true.shape}")
    out: dict[str, float] = {}
    for name, value in classes.items():
        out[f"dice_{name}"] = dice(pred == value, true == value)
        if hd and spacing is not None:
            out[f"hd95_{name}"] = hausdorff95(pred == value, true == value, spacing)
    out["mean_dice"] = float(np.mean([out[f"dice_{n}"] for n in classes]))
    if hd and spacing is not None:
        vals = [out[f"hd95_{n}"] for n in classes]
        out["mean_hd95"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out
