"""Clinical measures from segmentations: LV/RV EDV, ESV (mL), EF (%), volume curves over the cycle.

Why counting voxels: a structure's volume is (number of voxels carrying its label) x (voxel volume in mL). The
reference's preprocessing once summed the label VALUES of the whole mask (RV=1, MYO=2, LV=3; CineMA issue #30),
which mixes structures and weights them by their label number; `volume_ml` never does that.
Label maps are (X, Y, Z) ints in ACDC order; spacing (x, y, z) mm; 1 mL = 1000 mm^3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

STRUCTURES: dict[str, int] = {"rv": 1, "myo": 2, "lv": 3}
EF_CATEGORIES = ((40.0, "reduced"), (55.0, "borderline"), (float("inf"), "normal"))  # EF <= 40 / <= 55 / > 55


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL from (x, y, z) spacing in mm."""
    if len(spacing) < 3:
        raise ValueError(f"volumes need a 3-D spacing (x, y, z) mm, got {tuple(spacing)}")
    return float(np.prod([float(s) for s in spacing[:3]])) / 1000.0


def volume_ml(label: np.ndarray, value: int, spacing: Sequence[float]) -> float:
    """Volume (mL) of label `value`: COUNT of voxels equal to `value` x voxel volume."""
    return float(np.count_nonzero(np.asarray(label) == value)) * voxel_volume_ml(spacing)


def volumes_ml(label: np.ndarray, spacing: Sequence[float],
               structures: Mapping[str, int] = STRUCTURES) -> dict[str, float]:
    return {name: volume_ml(label, value, spacing) for name, value in structures.items()}


def ejection_fraction(edv: float, esv: float) -> float:
    """EF (%) = 100 (EDV - ESV) / EDV; NaN when EDV <= 0."""
    return float(100.0 * (edv - esv) / edv) if edv > 0 else float("nan")


def ef_category(ef: float) -> str:
    for upper, name in EF_CATEGORIES:
        if ef <= upper:
            return name
    return "unknown"


def ed_es_measures(ed_label: np.ndarray, es_label: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """lv_edv, lv_esv, rv_edv, rv_esv, myo_ed (mL) and lv_ef, rv_ef (%) from ED and ES label maps."""
    ed, es = volumes_ml(ed_label, spacing), volumes_ml(es_label, spacing)
    return {
        "lv_edv": ed["lv"], "lv_esv": es["lv"], "lv_ef": ejection_fraction(ed["lv"], es["lv"]),
        "rv_edv": ed["rv"], "rv_esv": es["rv"], "rv_ef": ejection_fraction(ed["rv"], es["rv"]),
        "myo_ed": ed["myo"],
    }


def volume_curves(labels_t: np.ndarray, spacing: Sequence[float],
                  structures: Mapping[str, int] = STRUCTURES) -> dict[str, np.ndarray]:
    """labels over the cycle (T, X, Y, Z) -> {'lv', 'rv', 'myo'}: (T,) float64 volumes in mL."""
    labels_t = np.asarray(labels_t)
    if labels_t.ndim != 4:
        raise ValueError(f"expected (T, X, Y, Z) labels, got shape {labels_t.shape}")
    vox = voxel_volume_ml(spacing)
    return {name: np.array([np.count_nonzero(f == value) * vox for f in labels_t], np.float64)
            for name, value in structures.items()}


def cycle_measures(curves: Mapping[str, np.ndarray]) -> dict[str, float]:
    """ED = frame of max LV volume, ES = frame of min; EDV/ESV/EF for LV and RV (RV at the LV's ED/ES frames and
    at its own extremes: `rv_ef` uses RV max/min)."""
    lv = np.asarray(curves["lv"], np.float64)
    ed, es = int(np.argmax(lv)), int(np.argmin(lv))
    out = {"ed_frame": ed, "es_frame": es, "lv_edv": float(lv[ed]), "lv_esv": float(lv[es]),
           "lv_ef": ejection_fraction(float(lv[ed]), float(lv[es]))}
    if "rv" in curves:
        rv = np.asarray(curves["rv"], np.float64)
        out.update(rv_edv=float(rv.max()), rv_esv=float(rv.min()),
                   rv_ef=ejection_fraction(float(rv.max()), float(rv.min())))
    return out


def error_stats(pred: Sequence[float], true: Sequence[float], prefix: str) -> dict[str, float]:
    """`<prefix>_mae`, `<prefix>_rmse`, `<prefix>_bias` (mean pred - true) over finite pairs."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    ok = np.isfinite(p) & np.isfinite(t)
    if not ok.any():
        return {f"{prefix}_mae": float("nan"), f"{prefix}_rmse": float("nan"), f"{prefix}_bias": float("nan")}
    d = p[ok] - t[ok]
    return {f"{prefix}_mae": float(np.abs(d).mean()), f"{prefix}_rmse": float(np.sqrt((d * d).mean())),
            f"{prefix}_bias": float(d.mean())}
