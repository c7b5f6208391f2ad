"""Known-answer tests for accuracy, balanced accuracy, AUROC (vs a hand count), F1, MCC and regression errors."""

import itertools

import numpy as np
import pytest

from cinema_jax.metrics import classification as cm


def _auc_by_pairs(y, s):
    pos = [v for v, t in zip(s, y) if t]
    neg = [v for v, t in zip(s, y) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_auroc_matches_pair_count():
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    s = [0.9, 0.3, 0.4, 0.8, 0.4, 0.1, 0.35, 0.7]
    assert cm.binary_auroc(y, s) == pytest.approx(_auc_by_pairs(y, s))
    assert cm.binary_auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0


def test_multiclass_ovr_auroc_and_others():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    p = rng.random((10, 3))
    want = np.mean([_auc_by_pairs(y == k, p[:, k]) for k in range(3)])
    assert cm.auroc_ovr(y, p) == pytest.approx(want)
    pred = np.array([0, 1, 2, 0, 1, 1, 0, 2, 2, 2])  # 8/10 right; recalls 1, 2/3, 3/4
    assert cm.accuracy(y, pred) == pytest.approx(0.8)
    assert cm.balanced_accuracy(y, pred) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    f1 = cm.f1_scores(y, pred)
    # class 0: tp3 fp0 fn0 -> 1; class 1: tp2 fp1 fn1 -> 2/3; class 2: tp3 fp1 fn1 -> 3/4
    assert f1["f1_macro"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert f1["f1_micro"] == pytest.approx(0.8)


def test_mcc_binary_formula_and_degenerate():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    want = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cm.mcc(y, p) == pytest.approx(want)
    assert cm.mcc(y, [1] * 8) == 0.0
    assert cm.mcc(y, y) == pytest.approx(1.0)


def test_regression_metrics():
    r = cm.regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    assert r["mae"] == pytest.approx(1.0) and r["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert r["max_error"] == 2.0 and r["bias"] == pytest.approx(1 / 3)
