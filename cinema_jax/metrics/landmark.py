"""Landmark metrics on LAX views: localisation error (mm), and MAPSE / GLS-style long-axis function over the cycle.

Landmarks: (K, 2) pixel (x, y) per image in the order mitral-valve hinge 1, hinge 2, apex (cinema_jax.data.phantom
LANDMARKS); over the cycle (T, 3, 2). `spacing` is the in-plane (x, y) pixel size in mm.

Definitions (reference examples: GLS = % change of the apex-to-mid-valve length; MAPSE in mm):
- long-axis length L_t = |apex_t - (hinge1_t + hinge2_t) / 2| (mm); GLS = 100 (min L - max L) / max L (negative,
  shortening), with ED = argmax L and ES = argmin L when frames are not given;
- MAPSE = mean over the two hinges of the range over the cycle of the hinge's distance to the apex measured along the
  ED long axis (mm): the annulus excursion toward the apex, insensitive to in-plane translation of the whole heart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LANDMARK_NAMES = ("mv_hinge_1", "mv_hinge_2", "apex")


def _mm(points: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    return np.asarray(points, np.float64) * np.asarray(spacing[:2], np.float64)


def landmark_errors_mm(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) per landmark: (..., K, 2) pixel coords -> (..., K)."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"landmark shapes differ: {p.shape} vs {t.shape}")
    return np.linalg.norm(_mm(p - t, spacing), axis=-1)


def landmark_metrics(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float],
                     names: Sequence[str] = LANDMARK_NAMES) -> dict[str, float]:
    """`dist_<name>` per landmark and `mean_distance` (mm), averaged over any leading (sample) axes."""
    err = landmark_errors_mm(pred, true, spacing).reshape(-1, np.asarray(pred).shape[-2])
    out = {f"dist_{n}": float(err[:, i].mean()) for i, n in enumerate(names[: err.shape[1]])}
    out["mean_distance"] = float(err.mean())
    return out


def long_axis_length_mm(landmarks_t: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(T, 3, 2) pixel landmarks -> (T,) apex-to-mid-valve distance in mm."""
    lm = _mm(landmarks_t, spacing)
    mid = 0.5 * (lm[:, 0] + lm[:, 1])
    return np.linalg.norm(lm[:, 2] - mid, axis=-1)


def gls_percent(landmarks_t: np.ndarray, spacing: Sequence[float], ed: int | None = None,
                es: int | None = None) -> float:
    """GLS-style strain (%) of the long-axis length between ED and ES (default: max and min length frames)."""
    length = long_axis_length_mm(landmarks_t, spacing)
    ed = int(np.argmax(length)) if ed is None else int(ed)
    es = int(np.argmin(length)) if es is None else int(es)
    return float(100.0 * (length[es] - length[ed]) / length[ed]) if length[ed] > 0 else float("nan")


def mapse_mm(landmarks_t: np.ndarray, spacing: Sequence[float], ed: int | None = None) -> float:
    """Mitral annular plane systolic excursion (mm): mean hinge excursion toward the apex along the ED long axis."""
    lm = _mm(landmarks_t, spacing)
    length = long_axis_length_mm(landmarks_t, spacing)
    ed = int(np.argmax(length)) if ed is None else int(ed)
    axis = lm[ed, 2] - 0.5 * (lm[ed, 0] + lm[ed, 1])
    norm = float(np.linalg.norm(axis))
    if norm == 0:
        return float("nan")
    axis /= norm
    exc = []
    for h in (0, 1):
        s = (lm[:, 2] - lm[:, h]) @ axis  # hinge-to-apex distance along the axis, per frame
        exc.append(float(s.max() - s.min()))
    return float(np.mean(exc))
