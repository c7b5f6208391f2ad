"""Known-answer tests for Dice and HD95 (mm, anisotropic spacing)."""

import numpy as np
import pytest

from cinema_jax.metrics.segmentation import dice, hausdorff95, segmentation_metrics


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_shifted_cubes():
    a = _cube((20, 20, 20), (0, 0, 0), (10, 10, 10))
    b = _cube((20, 20, 20), (5, 0, 0), (15, 10, 10))  # overlap 5x10x10 = 500 of 1000 each
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def _sphere(shape, centre, radius_mm, spacing):
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g * g for g in grids) <= radius_mm**2


def test_hd95_concentric_spheres_anisotropic():
    spacing = (1.0, 1.0, 2.5)
    shape, centre = (80, 80, 32), (40, 40, 16)
    inner = _sphere(shape, centre, 15.0, spacing)
    outer = _sphere(shape, centre, 25.0, spacing)
    hd = hausdorff95(inner, outer, spacing)
    assert hd == pytest.approx(10.0, abs=2.0)  # voxelised surfaces: within ~ one coarse voxel
    # pure shift along z by 4 slices = 10 mm
    shifted = np.roll(inner, 4, axis=2)
    assert hausdorff95(inner, shifted, spacing) == pytest.approx(10.0, abs=0.01)
    assert hausdorff95(inner, inner, spacing) == 0.0
    assert np.isnan(hausdorff95(inner, np.zeros_like(inner), spacing))


def test_segmentation_metrics_per_structure():
    true = np.zeros((30, 30, 4), np.int32)
    true[2:10, 2:10] = 1
    true[12:20, 12:20] = 3
    true[12:20, 20:24] = 2
    pred = true.copy()
    pred[12:20, 20:24] = 0  # MYO missed entirely
    m = segmentation_metrics(pred, true, (1.0, 1.0, 10.0))
    assert m["dice_RV"] == 1.0 and m["dice_LV"] == 1.0 and m["dice_MYO"] == 0.0
    assert m["mean_dice"] == pytest.approx(2 / 3)
    assert m["hd95_LV"] == 0.0 and np.isnan(m["hd95_MYO"])
    assert m["mean_hd95"] == 0.0
