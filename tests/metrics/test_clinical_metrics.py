"""Known-answer tests for volumes (voxel COUNTS, not label sums: CineMA issue #30), EF and volume curves."""

import numpy as np
import pytest

from cinema_jax.metrics import clinical


def test_volume_counts_voxels_not_label_values():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[:5, :4, :2] = 3  # 40 LV voxels
    lab[5:, :, :1] = 1  # 50 RV voxels
    lab[:5, 4:6, :2] = 2  # 20 MYO voxels
    spacing = (1.5, 1.5, 8.0)  # 18 mm^3 = 0.018 mL per voxel
    v = clinical.volumes_ml(lab, spacing)
    assert v["lv"] == pytest.approx(40 * 0.018)
    assert v["rv"] == pytest.approx(50 * 0.018)
    assert v["myo"] == pytest.approx(20 * 0.018)
    wrong = lab.astype(np.int64).sum() * 0.018  # issue #30's definition
    assert v["lv"] != pytest.approx(wrong)


def test_ef_of_known_volumes():
    assert clinical.ejection_fraction(150.0, 60.0) == pytest.approx(60.0)
    assert np.isnan(clinical.ejection_fraction(0.0, 0.0))
    ed = np.zeros((20, 20, 5), np.uint8)
    es = np.zeros_like(ed)
    ed[:10, :10, :] = 3  # 500 voxels
    es[:10, :5, :] = 3  # 250 voxels
    ed[10:, :, :2] = 1
    es[10:, :, :1] = 1
    m = clinical.ed_es_measures(ed, es, (1.0, 1.0, 10.0))
    assert m["lv_edv"] == pytest.approx(5.0) and m["lv_esv"] == pytest.approx(2.5)
    assert m["lv_ef"] == pytest.approx(50.0) and m["rv_ef"] == pytest.approx(50.0)
    assert clinical.ef_category(35) == "reduced" and clinical.ef_category(50) == "borderline"
    assert clinical.ef_category(62) == "normal"


def test_volume_curves_and_cycle():
    t = np.zeros((4, 8, 8, 2), np.uint8)
    for k, n in enumerate([30, 20, 10, 25]):
        t[k].reshape(-1)[:n] = 3
    curves = clinical.volume_curves(t, (1.0, 1.0, 10.0))
    assert np.allclose(curves["lv"], np.array([30, 20, 10, 25]) * 0.01)
    c = clinical.cycle_measures(curves)
    assert c["ed_frame"] == 0 and c["es_frame"] == 2
    assert c["lv_ef"] == pytest.approx(100 * 20 / 30)
    e = clinical.error_stats([1, 2, 3], [1, 1, 1], "ef")
    assert e["ef_mae"] == pytest.approx(1.0) and e["ef_rmse"] == pytest.approx(np.sqrt(5 / 3))
