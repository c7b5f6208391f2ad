"""Bad data reaching training / eval through the data sources: one-line CinemaErrors, never garbage batches."""

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from cinema_jax.config import load_base
from cinema_jax.data import pipeline, sunnybrook
from cinema_jax.data.arrayrecord import write_arrayrecord
from cinema_jax.data.h5cases import H5CaseSource
from cinema_jax.data.io import Volume
from cinema_jax.data.layout import LV, CinemaLayoutSource
from cinema_jax.errors import ConfigError, DataError
from cinema_jax.tasks import get_task

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _seg_config(**data):
    c = load_base(f"{CONFIGS}/finetune_seg.py:smoke")
    c.batch_size = 2
    c.data.augment.target_spacing = 1.5
    with c.unlocked():
        c.data.update(data)
    return c


def _record(**over):
    lab = np.zeros((24, 24, 3), np.uint8)
    lab[8:16, 8:16] = 3
    rec = {"kind": "layout", "pid": "p0", "phase": "ed", "uid": 0, "sax_ed": np.random.default_rng(0).random(
        (24, 24, 3)).astype(np.float32), "sax_ed_gt": lab, "sax_spacing": np.array([1.5, 1.5, 10.0], np.float32)}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def _transform(rec, config=None):
    return get_task("segment").transform(rec, np.random.default_rng(0), config or _seg_config(), True)


def test_good_layout_record_transforms():
    assert _transform(_record())["label"].max() == 3


@pytest.mark.parametrize("over, phrase", [
    (dict(sax_ed_gt=np.full((24, 24, 3), 7, np.uint8)), "outside 0-3"),
    (dict(sax_ed_gt=np.zeros((24, 20, 3), np.uint8)), "label shape"),
    (dict(sax_ed_gt=np.full((24, 24, 3), 0.5, np.float32)), "non-integer"),
    (dict(sax_ed_gt=None), "no 'sax' label"),
    (dict(sax_ed=np.full((24, 24, 3), np.nan, np.float32)), "NaN/Inf"),
    (dict(sax_ed=np.zeros((24, 24), np.float32)), "must be 3-D"),
    (dict(sax_spacing=np.array([np.nan, 1.5, 10.0], np.float32)), "finite positive"),
    (dict(sax_spacing=np.array([0.0, 1.5, 10.0], np.float32)), "finite positive"),
    (dict(sax_spacing=None), "no 'sax_spacing'"),
    (dict(sax_ed=None), "no 'sax_ed'"),
])
def test_bad_layout_or_arrayrecord_record_is_a_data_error(over, phrase):
    with pytest.raises(DataError, match=phrase):
        _transform(_record(**over))


def test_classify_and_landmark_refuse_bad_frames():
    c = load_base(f"{CONFIGS}/finetune_cls.py:smoke")
    rec = _record(sax_es=np.full((24, 24, 3), np.inf, np.float32), sax_es_gt=None, pathology="NOR")
    with pytest.raises(DataError, match="NaN/Inf"):
        get_task("classify").transform(rec, np.random.default_rng(0), c, True)
    from cinema_jax.tasks.common import load_frame

    rec = _record(sax_ed_landmarks=np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match=r"\(3, 2\)"):
        load_frame(rec, c, "sax")
    ok = np.array([[0.0, 0.0], [23.0, 23.0], [5.0, 20.0]], np.float32)
    assert np.array_equal(load_frame(_record(sax_ed_landmarks=ok), c, "sax")["landmarks"], ok)
    for bad in (ok + [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], ok - [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]):
        with pytest.raises(DataError, match="outside the \\(24, 24\\) image"):
            load_frame(_record(sax_ed_landmarks=bad), c, "sax")


def _layout(root, label_value=3):
    for split in ("train", "val"):
        for pid in ("p0", "p1"):
            for ph in ("ed", "es"):
                img = np.random.default_rng(1).random((24, 24, 3)).astype(np.float32)
                lab = np.zeros((24, 24, 3), np.uint8)
                lab[8:16, 8:16] = label_value
                for name, arr in ((f"{pid}_sax_{ph}", img), (f"{pid}_sax_{ph}_gt", lab)):
                    (root / split / pid).mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 10.0, 1.0])),
                             str(root / split / pid / f"{name}.nii.gz"))
        (root / f"{split}_metadata.csv").write_text("pid,pathology\np0,NOR\np1,DCM\n")


def test_layout_label_values_outside_classes_stop_training_and_eval(tmp_path):
    _layout(tmp_path, label_value=7)
    c = _seg_config(source="cinema_layout", root=str(tmp_path))
    task = get_task("segment")
    with pytest.raises(DataError, match="outside 0-3"):
        next(pipeline.train_iterator(task, c))
    with pytest.raises(DataError, match="outside 0-3"):
        next(iter(pipeline.eval_batches(task, c, "val")))


def test_arrayrecord_nan_image_stops_training(tmp_path):
    _layout(tmp_path / "layout")
    src = CinemaLayoutSource(tmp_path / "layout", "train")
    recs = [dict(src[i]) for i in range(len(src))]
    recs[0]["sax_es"] = np.full_like(recs[0]["sax_es"], np.nan)
    recs[1]["sax_es"] = recs[0]["sax_es"]
    write_arrayrecord(tmp_path / "ar" / "train.array_record", recs)
    c = _seg_config(source="arrayrecord", path=str(tmp_path / "ar"))
    it = pipeline.train_iterator(get_task("segment"), c)
    with pytest.raises(DataError, match="NaN/Inf"):
        for _ in range(2):
            next(it)


def test_sunnybrook_slice_items_are_a_config_error():
    rec = {"kind": "sunnybrook", "pid": "SCD", "phase": "ed", "slice": 3, "sax": np.zeros((8, 8), np.float32),
           "sax_gt": np.zeros((8, 8), np.uint8), "sax_spacing": np.ones(3, np.float32)}
    with pytest.raises(ConfigError, match="data.mode='volume'"):
        _transform(rec)


def _h5(path, image, gmap=None):
    with h5py.File(path, "w") as f:
        f["grp/case0/image"] = image
        if gmap is not None:
            f["grp/case0/gmap"] = gmap


def test_h5_all_zero_image_and_empty_gmap_are_data_errors(tmp_path):
    _h5(tmp_path / "zero.h5", np.zeros((16, 16, 4), np.complex64))
    with pytest.raises(DataError, match="all zero"):
        H5CaseSource([tmp_path / "zero.h5"])[0]
    _h5(tmp_path / "g0.h5", np.ones((16, 16, 4), np.complex64), np.ones((16, 16, 1, 0), np.float32))
    with pytest.raises(DataError, match="'gmap' must be"):
        H5CaseSource([tmp_path / "g0.h5"])[0]


def test_h5_all_zero_case_stops_denoise_training(tmp_path):
    _h5(tmp_path / "train.h5", np.zeros((40, 40, 8), np.complex64))
    c = load_base(f"{CONFIGS}/denoise.py:smoke")
    c.data.source, c.data.path, c.batch_size = "h5", str(tmp_path), 1
    with pytest.raises(DataError, match="all zero"):
        next(pipeline.train_iterator(get_task("denoise"), c))


def test_sunnybrook_contour_off_the_image_is_a_data_error(tmp_path, monkeypatch):
    files = [[f"{z * 3 + t + 1}.dcm" for t in range(3)] for z in range(2)]
    vol = Volume(np.ones((16, 16, 2, 3), np.float32), (1.0, 1.0, 8.0), np.eye(4), {"files": files})
    monkeypatch.setattr(sunnybrook, "read_dicom_series", lambda path: vol)
    sub = tmp_path / "SCD1"
    (sub / "dicom").mkdir(parents=True)
    (sub / "contours").mkdir()
    square = "4 4\n12 4\n12 12\n4 12\n"
    for num in (1, 2, 4, 5):
        (sub / "contours" / f"IM-0001-{num:04d}-icontour-manual.txt").write_text(square)
    assert sunnybrook.load_sunnybrook(tmp_path)[0].ed_label.max() == LV
    (sub / "contours" / "IM-0001-0005-icontour-manual.txt").write_text("400 400\n410 400\n410 410\n")
    with pytest.raises(DataError, match="outside the 16x16 image"):
        sunnybrook.load_sunnybrook(tmp_path)


def test_mae_record_with_nan_spacing_is_a_data_error():
    c = load_base(f"{CONFIGS}/mae_pretrain.py:smoke")
    c.data.views = ("sax",)
    rec = {"pid": "p0", "sax_ed": np.ones((24, 24, 3), np.float32), "sax_es": np.ones((24, 24, 3), np.float32),
           "sax_spacing": np.array([np.nan, 1.0, 10.0], np.float32)}
    task = get_task("pretrain_mae")
    with pytest.raises(DataError, match="sax_spacing"):
        task._record_frame(rec, np.random.default_rng(0), c, True)


def test_empty_arrayrecord_split_is_a_data_error_naming_the_file(tmp_path):
    write_arrayrecord(tmp_path / "train.array_record", [])
    c = _seg_config(source="arrayrecord", path=str(tmp_path))
    with pytest.raises(DataError, match=r"training source is empty: .*train\.array_record"):
        pipeline.train_dataset(get_task("segment"), c)
