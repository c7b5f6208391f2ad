"""Known-answer tests for landmark error (mm), GLS-style strain and MAPSE."""

import numpy as np
import pytest

from cinema_jax.metrics import landmark as lm


def test_landmark_error_mm_uses_spacing():
    pred = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    true = np.zeros((3, 2))
    err = lm.landmark_errors_mm(pred, true, (2.0, 0.5))
    assert np.allclose(err, [0.0, 6.0, 2.0])
    m = lm.landmark_metrics(pred[None], true[None], (2.0, 0.5))
    assert m["mean_distance"] == pytest.approx(8 / 3) and m["dist_mv_hinge_2"] == 6.0


def test_gls_and_mapse_of_a_shortening_ventricle():
    # apex fixed at y = 0; hinges at x = +-20, y = 100 at ED, moving to y = 88 at ES (12 mm MAPSE, length 100 -> 88)
    ys = [100.0, 94.0, 88.0, 96.0]
    lt = np.array([[[-20.0, y], [20.0, y], [0.0, 0.0]] for y in ys])
    spacing = (1.0, 1.0)
    assert lm.long_axis_length_mm(lt, spacing) == pytest.approx(ys)
    assert lm.gls_percent(lt, spacing) == pytest.approx(-12.0)
    assert lm.mapse_mm(lt, spacing) == pytest.approx(12.0)
    # in pixels at 0.5 mm: same physical answer
    assert lm.mapse_mm(lt * 2, (0.5, 0.5)) == pytest.approx(12.0)
    # a rigid translation of the whole heart changes nothing
    moved = lt + np.array([5.0, -3.0])[None, None] * np.arange(4)[:, None, None]
    assert lm.mapse_mm(moved, spacing) == pytest.approx(12.0)
