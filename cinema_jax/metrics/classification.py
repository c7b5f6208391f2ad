"""Classification and regression metrics (numpy): accuracy, balanced accuracy, one-vs-rest macro AUROC, F1, MCC,
MAE / RMSE.

Why one-vs-rest AUROC by ranks: it is the Mann-Whitney U statistic per class (ties count one half), exact and
dependency-free; the macro mean skips classes absent from the labels (AUROC undefined there).
Inputs: `y_true` (N,) int class ids, `y_pred` (N,) int, `probs` (N, C) float (rows need not be normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int | None = None) -> np.ndarray:
    """(C, C) int64 counts; rows = true class, columns = predicted class."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    n = int(n_classes if n_classes is not None else max(t.max(initial=-1), p.max(initial=-1)) + 1)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true, y_pred) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def balanced_accuracy(y_true, y_pred, n_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in `y_true`."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def f1_scores(y_true, y_pred, n_classes: int | None = None) -> dict[str, float]:
    """`f1_macro` (mean over classes present in truth or prediction) and `f1_micro` (= accuracy, single-label)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    active = (tp + fp + fn) > 0
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    macro = float(f1[active].mean()) if active.any() else float("nan")
    micro = float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1))
    return {"f1_macro": macro, "f1_micro": micro}


def mcc(y_true, y_pred, n_classes: int | None = None) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when undefined (a constant prediction or truth)."""
    cm = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    s = cm.sum()
    c = np.trace(cm)
    t, p = cm.sum(1), cm.sum(0)
    num = c * s - t @ p
    den = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float(num / den) if den > 0 else 0.0


def binary_auroc(y: Sequence[int], score: Sequence[float]) -> float:
    """AUROC of scores for the positive class (y == 1) via the rank-sum statistic; NaN if one class is absent."""
    y = np.asarray(y, bool)
    s = np.asarray(score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ovr(y_true, probs) -> float:
    """Macro one-vs-rest AUROC over the classes with both positives and negatives (binary: column 1)."""
    t = np.asarray(y_true, np.int64)
    pr = np.asarray(probs, np.float64)
    if pr.ndim != 2:
        raise ValueError(f"probs must be (N, C), got {pr.shape}")
    if pr.shape[1] == 2:
        return binary_auroc(t == 1, pr[:, 1])
    vals = [binary_auroc(t == k, pr[:, k]) for k in range(pr.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def classification_metrics(y_true, probs, n_classes: int | None = None) -> dict[str, float]:
    """accuracy, balanced_accuracy, auroc (OvR macro), f1_macro, f1_micro, mcc from labels and class scores."""
    pr = np.asarray(probs, np.float64)
    n = int(n_classes if n_classes is not None else pr.shape[1])
    pred = pr.argmax(1)
    out = {"accuracy": accuracy(y_true, pred), "balanced_accuracy": balanced_accuracy(y_true, pred, n),
           "auroc": auroc_ovr(y_true, pr), "mcc": mcc(y_true, pred, n)}
    out.update(f1_scores(y_true, pred, n))
    return out


def regression_metrics(pred, true) -> dict[str, float]:
    """mae, rmse, max_error (absolute), bias (mean pred - true), r (Pearson; NaN if constant)."""
    p, t = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"pred and true must have the same non-zero size, got {p.shape} vs {t.shape}")
    d = p - t
    r = float(np.corrcoef(p, t)[0, 1]) if p.size > 1 and p.std() > 0 and t.std() > 0 else float("nan")
    return {"mae": float(np.abs(d).mean()), "rmse": float(np.sqrt((d * d).mean())),
            "max_error": float(np.abs(d).max()), "bias": float(d.mean()), "r": r}
