"""CineMA layout: preparation from fake raw ACDC / M&Ms / M&Ms-2 trees, the layout source, preprocessing helpers,
packing into ArrayRecord and the TFDS builders over it."""

import csv
import sys

import nibabel as nib
import numpy as np
import pytest

from cinema_jax.data.layout import (
    CinemaLayoutSource,
    crop_in_plane,
    label_volumes_ml,
    normalise_intensity,
    pack_layout,
    resample,
    write_metadata_csv,
)
from cinema_jax.data.prepare import prepare
from cinema_jax.errors import CinemaError, ConfigError, DataError


def _heart(shape, centre, r_lv, seed=0, lv=3, myo=2, rv=1):
    """Image and label (x, y, z): LV disc, 4-px MYO ring, RV disc beside it, on noisy background."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d = np.hypot(x - centre[0], y - centre[1])
    d_rv = np.hypot(x - centre[0] + r_lv + 10, y - centre[1])
    lab2 = np.zeros(shape[:2], np.uint8)
    lab2[d_rv < 7] = rv
    lab2[d < r_lv + 4] = myo
    lab2[d < r_lv] = lv
    lab = np.repeat(lab2[:, :, None], shape[2], axis=2)
    lab[:, :, 0] = 0  # basal slice empty
    rng = np.random.default_rng(seed)
    img = 20 + 5 * rng.standard_normal(shape)
    img[lab == lv] += 180
    img[lab == rv] += 160
    img[lab == myo] += 60
    return img.astype(np.float32), lab


def _save(path, arr, spacing):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag(list(spacing) + [1.0])), str(path))


SP = (1.5, 1.5, 10.0)


def _fake_acdc(root, n=3, testing=1):
    truth = {}
    for i in range(1, n + testing + 1):
        split = "training" if i <= n else "testing"
        pid = f"patient{i:03d}"
        d = root / "database" / split / pid
        d.mkdir(parents=True)
        (d / "Info.cfg").write_text(f"ED: 1\nES: 7\nGroup: {'DCM' if i % 2 else 'NOR'}\nHeight: 180.0\n"
                                    f"NbFrame: 12\nWeight: 81.0\n")
        for frame, r in ((1, 12), (7, 8)):
            img, lab = _heart((60, 50, 4), (34 + i, 22), r, seed=i)
            _save(d / f"{pid}_frame{frame:02d}.nii.gz", img, SP)
            _save(d / f"{pid}_frame{frame:02d}_gt.nii.gz", lab, SP)
            truth[(pid, frame)] = lab
    return truth


def test_prepare_acdc_layout_metadata_and_volumes(tmp_path):
    truth = _fake_acdc(tmp_path / "raw", n=3)
    counts = prepare("acdc", tmp_path / "raw", tmp_path / "out", val_fraction=0.34)
    assert counts == {"train": 2, "val": 1, "test": 1}
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["patient001", "patient002"]
    rows = list(csv.DictReader(open(out / "train_metadata.csv")))
    row = rows[0]
    assert row["pid"] == "patient001" and row["pathology"] == "DCM"
    assert (row["ed_frame"], row["es_frame"], row["n_frames"]) == ("0", "6", "12")
    voxel_ml = 1.5 * 1.5 * 10 / 1000
    lab_ed, lab_es = truth[("patient001", 1)], truth[("patient001", 7)]
    assert float(row["lv_edv"]) == pytest.approx((lab_ed == 3).sum() * voxel_ml, abs=1e-3)
    assert float(row["lv_esv"]) == pytest.approx((lab_es == 3).sum() * voxel_ml, abs=1e-3)
    assert float(row["rv_edv"]) == pytest.approx((lab_ed == 1).sum() * voxel_ml, abs=1e-3)
    edv, esv = float(row["lv_edv"]), float(row["lv_esv"])
    assert float(row["lv_ef"]) == pytest.approx(100 * (edv - esv) / edv, abs=1e-3)
    assert float(row["bmi"]) == pytest.approx(81 / 1.8**2, abs=1e-3)

    src = CinemaLayoutSource(out, "train", views=("sax",))
    assert len(src) == 2
    item = src[0]
    assert item["sax_ed"].shape == (192, 192, 4) and item["sax_ed"].dtype == np.float32
    assert item["sax_ed_gt"].dtype == np.uint8 and item["sax_es_gt"].shape == (192, 192, 4)
    assert 0.0 <= item["sax_ed"].min() and item["sax_ed"].max() <= 1.0 and item["sax_ed"].max() > 0.9
    np.testing.assert_allclose(item["sax_spacing"], (1, 1, 10))
    # LV centred in the crop; resampled LV voxel count ~ original count x (1.5 / 1)^2
    lv = np.argwhere(item["sax_ed_gt"] == 3)
    assert np.abs(lv[:, :2].min(0) + lv[:, :2].max(0) - 191).max() <= 2
    assert (item["sax_ed_gt"] == 3).sum() == pytest.approx((lab_ed == 3).sum() * 2.25, rel=0.05)
    assert item["sax_ed"][item["sax_ed_gt"] == 3].mean() > item["sax_ed"].mean()
    assert item["pid"] == "patient001" and item["lv_edv"] == pytest.approx(edv, abs=1e-3)
    assert repr(src) == repr(CinemaLayoutSource(out, "train"))
    assert "CinemaLayoutSource(root=" in repr(src) and "0x" not in repr(src)
    with pytest.raises(IndexError):
        src[5]


def test_prepare_is_atomic_on_bad_input(tmp_path):
    _fake_acdc(tmp_path / "raw", n=2, testing=0)
    bad = tmp_path / "raw/database/training/patient002/patient002_frame07.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="patient002_frame07.nii.gz"):
        prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp dir left


def test_prepare_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        prepare("kaggle", tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="not found"):
        prepare("acdc", tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no ACDC"):
        prepare("acdc", tmp_path / "empty", tmp_path / "o")


def test_prepare_mnms_4d_csv_and_label_mapping(tmp_path):
    raw = tmp_path / "OpenDataset"
    rows = []
    for split, pid in (("Training/Labeled", "A0S9V9"), ("Validation", "B1C2D3"), ("Testing", "C9X8Y7")):
        frames_img, frames_lab = [], []
        for t in range(5):
            img, lab = _heart((48, 48, 3), (24, 24), 10 if t == 0 else 6, seed=t)
            # M&Ms order: 1 LV, 2 MYO, 3 RV
            frames_img.append(img)
            frames_lab.append(_relabel_mnms(lab) if t in (0, 3) else np.zeros_like(lab))
        _save(raw / split / pid / f"{pid}_sa.nii.gz", np.stack(frames_img, -1), (1.25, 1.25, 10.0))
        _save(raw / split / pid / f"{pid}_sa_gt.nii.gz", np.stack(frames_lab, -1), (1.25, 1.25, 10.0))
        rows.append({"External code": pid, "VendorName": "Siemens", "Vendor": "A", "Centre": 1, "ED": 0, "ES": 3,
                     "Age": 50, "Pathology": "HCM", "Sex": "M", "Height": 170, "Weight": 70})
    with open(raw / "mnms_info.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert prepare("mnms", raw, tmp_path / "out") == {"train": 1, "val": 1, "test": 1}
    item = CinemaLayoutSource(tmp_path / "out", "val")[0]
    assert item["pid"] == "B1C2D3" and item["vendor"] == "Siemens" and item["es_frame"] == 3
    ed = item["sax_ed_gt"]
    assert set(np.unique(ed)) == {0, 1, 2, 3}
    assert item["sax_ed"][ed == 3].mean() > item["sax_ed"][ed == 2].mean()  # LV (bright) mapped to 3
    assert item["lv_edv"] > item["lv_esv"] > 0


def _relabel_mnms(lab):
    out = lab.copy()
    out[lab == 3], out[lab == 1] = 1, 3
    return out


def test_prepare_mnms2_sax_and_lax(tmp_path):
    raw = tmp_path / "MnM2"
    for pid in ("001", "170"):
        d = raw / "dataset" / pid
        for phase, r in (("ED", 11), ("ES", 7)):
            img, lab = _heart((40, 40, 3), (20, 20), r)
            _save(d / f"{pid}_SA_{phase}.nii.gz", img, (1.4, 1.4, 9.0))
            _save(d / f"{pid}_SA_{phase}_gt.nii.gz", _relabel_mnms(lab), (1.4, 1.4, 9.0))
            img2, lab2 = _heart((50, 44, 1), (25, 20), r)
            lab2[:, :, 0] = _heart((50, 44, 2), (25, 20), r)[1][:, :, 1]
            _save(d / f"{pid}_LA_{phase}.nii.gz", img2, (1.6, 1.6, 8.0))
            _save(d / f"{pid}_LA_{phase}_gt.nii.gz", _relabel_mnms(lab2), (1.6, 1.6, 8.0))
    (raw / "dataset_information.csv").write_text("SUBJECT_CODE,DISEASE,SEX,AGE\n1,NOR,M,40\n170,ARR,F,61\n")
    assert prepare("mnms2", raw, tmp_path / "out") == {"train": 1, "val": 1}
    src = CinemaLayoutSource(tmp_path / "out", "train", views=("sax", "lax_4c"))
    item = src[0]
    assert item["pathology"] == "NOR" and item["pid"] == "001"
    assert item["sax_ed"].shape == (192, 192, 3) and item["lax_4c_ed"].shape == (256, 256)
    assert item["lax_4c_es_gt"].shape == (256, 256)
    np.testing.assert_allclose(item["lax_4c_spacing"], (1, 1))
    assert item["lax_4c_ed"][item["lax_4c_ed_gt"] == 3].mean() > item["lax_4c_ed"].mean()


def test_layout_source_errors_and_uint8(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CinemaLayoutSource(tmp_path / "none", "train")
    root = tmp_path / "ds"
    img, lab = _heart((32, 32, 2), (16, 16), 6)
    u8 = np.round(img / img.max() * 255).astype(np.uint8)
    for phase in ("ed", "es"):
        _save(root / "train/p1" / f"p1_sax_{phase}.nii.gz", u8, (1, 1, 10))
        _save(root / "train/p1" / f"p1_sax_{phase}_gt.nii.gz", lab, (1, 1, 10))
    with pytest.raises(DataError, match="train_metadata.csv"):
        CinemaLayoutSource(root, "train")
    write_metadata_csv(root / "train_metadata.csv", [{"pid": "p1", "lv_edv": 100.0, "pathology": "NOR"}])
    item = CinemaLayoutSource(root, "train")[0]
    assert item["sax_ed"].max() == pytest.approx(1.0) and item["sax_ed"].dtype == np.float32
    assert item["lv_edv"] == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="unknown view"):
        CinemaLayoutSource(root, "train", views=("lax_5c",))
    (root / "train/p1/p1_sax_es_gt.nii.gz").unlink()
    with pytest.raises(DataError, match="p1_sax_es_gt.nii.gz.*not found"):
        CinemaLayoutSource(root, "train")[0]


def test_preprocess_helpers():
    img = np.arange(20 * 10 * 3, dtype=np.float32).reshape(20, 10, 3)
    out, aff = resample(img, (2.0, 2.0, 5.0), (1.0, 1.0, 10.0), 1, np.diag([2.0, 2.0, 5.0, 1.0]))
    assert out.shape == (40, 20, 2)
    # voxel centre 0 of the new grid sits half an old voxel minus half a new voxel from the old origin
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [-0.5, -0.5, 2.5, 1])
    crop, valid, _ = crop_in_plane(np.ones((10, 10, 2)), (2, 2), (8, 8))
    assert crop.shape == (8, 8, 2) and valid.sum() == 6 * 6
    norm = normalise_intensity(np.linspace(0, 100, 1001))
    assert norm.min() == 0 and norm.max() == 1
    assert label_volumes_ml(np.array([[3, 3], [1, 2]]), (10, 10, 10)) == {"lv": 2.0, "rv": 1.0, "myo": 1.0}

# ============================================================================================================= TFDS
def test_tfds_module_is_tf_free_and_explains_missing_extra():
    from cinema_jax.data import tfds_builders

    assert "tensorflow" not in sys.modules
    if tfds_builders.tfds_available():
        pytest.skip("tensorflow-datasets installed: the missing-extra message is not reachable")
    with pytest.raises(CinemaError, match=r"pip install '\.\[tfds\]'"):
        tfds_builders.builders()


@pytest.mark.slow
@pytest.mark.tfds
def test_tfds_synthetic_builder(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from cinema_jax.data import tfds_builders

    monkeypatch.setattr(tfds_builders, "SYNTHETIC_SPLITS", {"train": 2, "val": 1, "test": 1})
    src = tfds_builders.data_source("cinema_synthetic", "train", data_dir=tmp_path)
    assert len(src) == 2
    rec = src[0]
    assert rec["sax_ed"].shape == (192, 192, 16) and rec["lax_4c_ed_landmarks"].shape == (3, 2)


@pytest.mark.slow
@pytest.mark.tfds
def test_tfds_layout_builder(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from cinema_jax.data import tfds_builders

    _fake_acdc(tmp_path / "raw", n=2, testing=0)
    prepare("acdc", tmp_path / "raw", tmp_path / "processed", val_fraction=0.0)
    src = tfds_builders.data_source("cinema_layout", "train", data_dir=tmp_path / "tfds",
                                    manual_dir=tmp_path / "processed")
    assert len(src) == 2 and src[0]["sax_ed"].shape[:2] == (192, 192)


# ------------------------------------------------------------------------------------------------- bad-input fixes
def test_prepare_refuses_label_values_outside_0_to_3(tmp_path):
    """A label file with {0, 3, 6, 9} used to give wrong LV volumes / EF without a word."""
    _fake_acdc(tmp_path / "raw", n=1, testing=0)
    gt = tmp_path / "raw/database/training/patient001/patient001_frame07_gt.nii.gz"
    lab = np.asarray(nib.load(str(gt)).dataobj)
    _save(gt, (lab * 3).astype(np.uint8), SP)
    with pytest.raises(DataError, match=r"patient001_frame07_gt.nii.gz: label values \[6, 9\] outside 0-3"):
        prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_acdc_info_cfg_frame_0_and_parse_errors(tmp_path):
    _fake_acdc(tmp_path / "raw", n=1, testing=0)
    cfg = tmp_path / "raw/database/training/patient001/Info.cfg"
    cfg.write_text("ED: 0\nES: 7\n")
    with pytest.raises(DataError, match=r"Info.cfg: ED 0 / ES 7 must be >= 1 \(ACDC frames are 1-based\)"):
        prepare("acdc", tmp_path / "raw", tmp_path / "out")
    cfg.write_text("ED: 1\nthis line has no colon\n")
    with pytest.raises(DataError, match="Info.cfg: cannot parse") as err:
        prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert "\n" not in str(err.value)  # configparser's message spans lines; the CLI prints one
    assert not (tmp_path / "out").exists()


def test_pack_layout_refuses_empty_views_and_names_the_flag(tmp_path):
    _fake_acdc(tmp_path / "raw", n=1, testing=0)
    prepare("acdc", tmp_path / "raw", tmp_path / "lay", val_fraction=0.0)
    with pytest.raises(ConfigError, match="no views to pack"):
        pack_layout(tmp_path / "lay", tmp_path / "p", views=())
    with pytest.raises(DataError, match=r"patient001_sax_t.nii.gz: file not found \(layouts made by `data prepare` "
                                        r"have ED/ES but no cine files: pack them with --no-cine\)"):
        pack_layout(tmp_path / "lay", tmp_path / "p", views=("sax",))
    assert not (tmp_path / "p").exists()
    assert pack_layout(tmp_path / "lay", tmp_path / "p", views=("sax",), cine=False)["train"] == 1
