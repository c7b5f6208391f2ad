"""Real data: Sunnybrook SAX cine DICOM + expert contours (../shared/data/sunnybrook; skipped when absent)."""

import numpy as np
import pytest

from cinema_jax.data.io import read_dicom_series
from cinema_jax.data.layout import label_volumes_ml
from cinema_jax.data.sunnybrook import SunnybrookSource, load_sunnybrook, polygon_mask, read_contour
from cinema_jax.errors import DataError


@pytest.fixture(scope="module")
def subjects(sunnybrook_dir):
    return load_sunnybrook(sunnybrook_dir)


def test_cine_volumes_load_sorted(subjects, sunnybrook_dir):
    assert [s.pid for s in subjects] == ["SCD0000101", "SCD0000201", "SCD0000301"]
    shapes = {s.pid: s.image.array.shape for s in subjects}
    assert shapes == {"SCD0000101": (256, 256, 12, 20), "SCD0000201": (256, 256, 13, 20),
                      "SCD0000301": (256, 256, 10, 20)}
    for s in subjects:
        times = s.image.meta["trigger_times"]
        assert (np.diff(times, axis=1) > 0).all()  # frames sorted by trigger time on every slice
        assert (np.diff(s.image.meta["slice_positions"]) > 0).all()  # slices sorted along the normal
        assert s.spacing[0] == pytest.approx(s.spacing[1]) and 1.2 < s.spacing[0] < 1.4
        assert 5.0 < s.spacing[2] <= 10.5


def test_masks_line_up_with_blood_pool(subjects):
    for s in subjects:
        for phase, lab in (("ed", s.ed_label), ("es", s.es_label)):
            img = s.frame(phase)
            lv = lab == 3
            assert lv.sum() > 500
            # blood pool (bSSFP) is brighter than the image mean and than the myocardium around it
            assert img[lv].mean() > 2.0 * img.mean(), (s.pid, phase)
        img = s.frame("ed")
        assert img[s.ed_label == 3].mean() > 1.5 * img[s.ed_label == 2].mean()
        assert (s.es_label == 2).sum() == 0  # epicardial contours exist at ED only
        # every annotated slice has LV at both phases, and the LV is one blob per slice
        for z in s.annotated_slices:
            assert (s.ed_label[:, :, z] == 3).any() and (s.es_label[:, :, z] == 3).any()


def test_physiological_volumes_and_ef(subjects):
    for s in subjects:
        v = s.lv_volumes()
        assert s.ed_frame != s.es_frame
        assert 60 < v["lv_edv"] < 400, (s.pid, v)
        assert 20 < v["lv_esv"] < v["lv_edv"], (s.pid, v)
        assert 15 < v["lv_ef"] < 85, (s.pid, v)
        # myocardial volume on the annotated slices at ED: physiological mass range (1.05 g/mL)
        myo_ml = label_volumes_ml(s.ed_label[:, :, list(s.annotated_slices)], s.spacing)["myo"]
        assert 50 < myo_ml * 1.05 < 300


def test_sunnybrook_source_volume_and_slice(sunnybrook_dir):
    src = SunnybrookSource(sunnybrook_dir, mode="volume", subjects=["SCD0000301"])
    assert len(src) == 2
    item = src[0]
    assert item["phase"] == "ed" and item["sax"].shape == (256, 256, 10) and item["sax_gt"].dtype == np.uint8
    assert 0 <= item["sax"].min() and item["sax"].max() <= 1 and item["annotated"].sum() >= 8
    assert "SunnybrookSource(" in repr(src) and "0x" not in repr(src)
    pre = SunnybrookSource(sunnybrook_dir, mode="volume", preprocess=True, subjects=["SCD0000301"])[0]
    assert pre["sax"].shape[:2] == (192, 192)
    np.testing.assert_allclose(pre["sax_spacing"], (1, 1, 10))
    assert pre["sax"][pre["sax_gt"] == 3].mean() > pre["sax"].mean()
    slices = SunnybrookSource(sunnybrook_dir, mode="slice", subjects=["SCD0000301"])
    assert len(slices) == 2 * int(item["annotated"].sum())
    s0 = slices[0]
    assert s0["sax"].shape == (256, 256) and (s0["sax_gt"] == 3).any()


def test_sunnybrook_bad_inputs(tmp_path, sunnybrook_dir):
    with pytest.raises(DataError, match="not found"):
        load_sunnybrook(tmp_path / "none")
    with pytest.raises(DataError, match="SCD9"):
        load_sunnybrook(sunnybrook_dir, subjects=["SCD9"])
    bad = tmp_path / "IM-0001-0048-icontour-manual.txt"
    bad.write_text("1 2\nthree four\n")
    with pytest.raises(DataError, match="IM-0001-0048-icontour-manual.txt"):
        read_contour(bad)
    # a single DICOM file of the real series reads as a 1-slice, 1-frame volume
    vol = read_dicom_series([sunnybrook_dir / "SCD0000101" / "dicom" / "1.dcm"])
    assert vol.array.shape == (256, 256, 1, 1)


def test_polygon_mask_square():
    pts = np.array([[2.0, 2.0], [6.0, 2.0], [6.0, 5.0], [2.0, 5.0]])
    mask = polygon_mask(pts, (10, 8))
    assert mask.sum() == 4 * 3 and mask[2, 2] and not mask[6, 2]  # half-open even-odd rule
