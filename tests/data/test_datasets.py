"""CineMA layout preparation (fake raw ACDC / M&Ms / M&Ms-2 trees), layout source, ArrayRecord and dispatch."""

import csv
import sys

import nibabel as nib
import numpy as np
import pytest

from cinema_jax.data import datasets as D
from cinema_jax.data import phantom as phantom_lib
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
    counts = D.prepare("acdc", tmp_path / "raw", tmp_path / "out", val_fraction=0.34)
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

    src = D.CinemaLayoutSource(out, "train", views=("sax",))
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
    assert repr(src) == repr(D.CinemaLayoutSource(out, "train"))
    assert "CinemaLayoutSource(root=" in repr(src) and "0x" not in repr(src)
    with pytest.raises(IndexError):
        src[5]


def test_prepare_is_atomic_on_bad_input(tmp_path):
    _fake_acdc(tmp_path / "raw", n=2, testing=0)
    bad = tmp_path / "raw/database/training/patient002/patient002_frame07.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="patient002_frame07.nii.gz"):
        D.prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp dir left


def test_prepare_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        D.prepare("kaggle", tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="not found"):
        D.prepare("acdc", tmp_path / "nothing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no ACDC"):
        D.prepare("acdc", tmp_path / "empty", tmp_path / "o")


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
    assert D.prepare("mnms", raw, tmp_path / "out") == {"train": 1, "val": 1, "test": 1}
    item = D.CinemaLayoutSource(tmp_path / "out", "val")[0]
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
    assert D.prepare("mnms2", raw, tmp_path / "out") == {"train": 1, "val": 1}
    src = D.CinemaLayoutSource(tmp_path / "out", "train", views=("sax", "lax_4c"))
    item = src[0]
    assert item["pathology"] == "NOR" and item["pid"] == "001"
    assert item["sax_ed"].shape == (192, 192, 3) and item["lax_4c_ed"].shape == (256, 256)
    assert item["lax_4c_es_gt"].shape == (256, 256)
    np.testing.assert_allclose(item["lax_4c_spacing"], (1, 1))
    assert item["lax_4c_ed"][item["lax_4c_ed_gt"] == 3].mean() > item["lax_4c_ed"].mean()


def test_layout_source_errors_and_uint8(tmp_path):
    with pytest.raises(DataError, match="not found"):
        D.CinemaLayoutSource(tmp_path / "none", "train")
    root = tmp_path / "ds"
    img, lab = _heart((32, 32, 2), (16, 16), 6)
    u8 = np.round(img / img.max() * 255).astype(np.uint8)
    for phase in ("ed", "es"):
        _save(root / "train/p1" / f"p1_sax_{phase}.nii.gz", u8, (1, 1, 10))
        _save(root / "train/p1" / f"p1_sax_{phase}_gt.nii.gz", lab, (1, 1, 10))
    with pytest.raises(DataError, match="train_metadata.csv"):
        D.CinemaLayoutSource(root, "train")
    D.write_metadata_csv(root / "train_metadata.csv", [{"pid": "p1", "lv_edv": 100.0, "pathology": "NOR"}])
    item = D.CinemaLayoutSource(root, "train")[0]
    assert item["sax_ed"].max() == pytest.approx(1.0) and item["sax_ed"].dtype == np.float32
    assert item["lv_edv"] == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="unknown view"):
        D.CinemaLayoutSource(root, "train", views=("lax_5c",))
    (root / "train/p1/p1_sax_es_gt.nii.gz").unlink()
    with pytest.raises(DataError, match="p1_sax_es_gt.nii.gz.*not found"):
        D.CinemaLayoutSource(root, "train")[0]


def test_preprocess_helpers():
    img = np.arange(20 * 10 * 3, dtype=np.float32).reshape(20, 10, 3)
    out, aff = D.resample(img, (2.0, 2.0, 5.0), (1.0, 1.0, 10.0), 1, np.diag([2.0, 2.0, 5.0, 1.0]))
    assert out.shape == (40, 20, 2)
    # voxel centre 0 of the new grid sits half an old voxel minus half a new voxel from the old origin
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [-0.5, -0.5, 2.5, 1])
    crop, valid, _ = D.crop_in_plane(np.ones((10, 10, 2)), (2, 2), (8, 8))
    assert crop.shape == (8, 8, 2) and valid.sum() == 6 * 6
    norm = D.normalise_intensity(np.linspace(0, 100, 1001))
    assert norm.min() == 0 and norm.max() == 1
    assert D.label_volumes_ml(np.array([[3, 3], [1, 2]]), (10, 10, 10)) == {"lv": 2.0, "rv": 1.0, "myo": 1.0}


# ====================================================================================================== ArrayRecord
def _records(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"pid": f"s{i}", "image": rng.random((6, 5, 2)).astype(np.float32), "label": np.full((3,), i, np.uint8),
               "ef": 55.5 + i, "n": i, "site": {"name": "A", "noise": np.float32(0.1)}}


def test_arrayrecord_roundtrip_and_grain(tmp_path):
    import grain

    path = tmp_path / "train.array_record"
    assert D.write_arrayrecord(path, _records(5), quantize=("image",)) == 5
    src = D.ArrayRecordSource(path)
    assert len(src) == 5 and repr(src) == repr(D.ArrayRecordSource(str(path)))
    ref = list(_records(5))
    for i in (0, 3, -1):
        rec, want = src[i], ref[i]
        assert rec["pid"] == want["pid"] and isinstance(rec["pid"], str)
        np.testing.assert_allclose(rec["image"], want["image"], atol=1 / 255)
        assert rec["image"].dtype == np.float32
        np.testing.assert_array_equal(rec["label"], want["label"])
        assert rec["ef"] == want["ef"] and rec["n"] == want["n"]
        assert rec["site"] == {"name": "A", "noise": np.float32(0.1)}
    exact = tmp_path / "exact.array_record"
    D.write_arrayrecord(exact, _records(2))
    np.testing.assert_array_equal(D.ArrayRecordSource(exact)[1]["image"], ref[1]["image"])
    both = D.ArrayRecordSource([path, exact])
    assert len(both) == 7 and both[5]["pid"] == "s0"
    assert len(D.ArrayRecordSource(tmp_path)) == 7  # a directory = all its files
    ds = grain.MapDataset.source(src).shuffle(seed=1).map(lambda r: r["label"]).batch(2, drop_remainder=True)
    batches = list(ds)
    assert len(batches) == 2 and batches[0].shape == (2, 3)


def test_arrayrecord_errors_and_atomic(tmp_path):
    with pytest.raises(DataError, match="missing.array_record.*not found"):
        D.ArrayRecordSource(tmp_path / "missing.array_record")
    junk = tmp_path / "junk.array_record"
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DataError, match="junk.array_record"):
        src = D.ArrayRecordSource(junk)
        src[0]

    def failing():
        yield from _records(2)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        D.write_arrayrecord(tmp_path / "half.array_record", failing())
    assert not any(p.name.startswith(".half") or p.name == "half.array_record" for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="cannot decode"):
        D.decode_record(b"not an npz", "x")
    with pytest.raises(ValueError, match="not an array"):
        D.encode_record({"bad": object()})


@pytest.mark.parametrize("frame_records", [False, True])
def test_cine_stored_per_frame_decodes_one_frame(tmp_path, monkeypatch, frame_records):
    import pickle

    rng = np.random.default_rng(1)
    cines = [rng.random((6, 5, 3, 7)).astype(np.float32) for _ in range(3)]
    counts = rng.integers(0, 9, (4, 7)).astype(np.int16)
    path = tmp_path / "cine.array_record"
    recs = [{"pid": f"s{i}", "sax_t": c, "n": counts + i, "still": c[..., 0]} for i, c in enumerate(cines)]
    assert D.write_arrayrecord(path, recs, quantize=("sax_t",), frames=("sax_t", "n"),
                               frame_records=frame_records) == 3
    assert D.frames_path(path).is_file() == frame_records
    src = D.ArrayRecordSource(tmp_path)  # a directory: the companion is not a dataset file of its own
    assert len(src) == 3 and src.paths == (str(path),)
    for i in (2, 0, 1):  # any order: each record finds its own frames
        rec = src[i]
        stack, ints = rec["sax_t"], rec["n"]
        assert isinstance(stack, D.FrameStack) and stack.shape == (6, 5, 3, 7) and stack.ndim == 4
        assert stack.dtype == np.float32 and ints.dtype == np.int16 and np.ndim(stack) == 4
        np.testing.assert_allclose(np.asarray(stack), cines[i], atol=0.5 / 255)
        np.testing.assert_array_equal(np.asarray(ints), counts + i)
        np.testing.assert_allclose(D.frame_of(stack, 4), cines[i][..., 4], atol=0.5 / 255)
        np.testing.assert_allclose(D.frame_of(stack, -1), cines[i][..., 6], atol=0.5 / 255)
        np.testing.assert_allclose(rec["still"], cines[i][..., 0])
    np.testing.assert_array_equal(D.frame_of(cines[0], 2), cines[0][..., 2])  # plain arrays too
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(stack)), np.asarray(stack))
    with pytest.raises(IndexError, match="frame 7 out of range"):
        stack.frame(7)
    # only the requested frame's member is decompressed
    seen = []
    load = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: seen.append(k) or load(self, k))
    stack.frame(3)
    assert seen == (["sax_t::u8"] if frame_records else ["sax_t@t00003::u8"])
    if frame_records:
        with pytest.raises(DataError, match="companion"):
            D.decode_record(src._sources[0][0])["sax_t"].frame(0)
        with pytest.raises(ValueError, match="different frame counts"):
            D.write_arrayrecord(tmp_path / "bad.array_record", [{"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}],
                                frames=("a", "b"), frame_records=True)
        assert not (tmp_path / "bad.array_record").exists() and not D.frames_path(tmp_path / "bad").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.array_record", "cine.frames.array_record"]
    with pytest.raises(ValueError, match="must not contain"):
        D.encode_record({"a@t": np.zeros(2)})
    with pytest.raises(ValueError, match="last axis"):
        D.encode_record({"v": np.zeros(3)}, frames=("v",))


def test_frame_records_across_several_files(tmp_path):
    rng = np.random.default_rng(2)
    cines = [rng.random((4, 3, 2 + i)).astype(np.float32) for i in range(5)]  # different lengths per subject
    D.write_arrayrecord(tmp_path / "a.array_record", [{"pid": f"s{i}", "v_t": cines[i]} for i in range(2)],
                        quantize=("v_t",), frames=("v_t",), frame_records=True)
    D.write_arrayrecord(tmp_path / "b.array_record", [{"pid": f"s{i}", "v_t": cines[i]} for i in range(2, 5)],
                        quantize=("v_t",), frames=("v_t",), frame_records=True)
    src = D.ArrayRecordSource([tmp_path / "a.array_record", tmp_path / "b.array_record"])
    assert len(src) == 5 and len(D.ArrayRecordSource(tmp_path)) == 5
    for i in (4, 1, 3, 0, 2, -1):
        rec = src[i]
        assert rec["pid"] == f"s{i % 5}" and rec["v_t"].shape == cines[i].shape
        t = cines[i].shape[-1] - 1
        np.testing.assert_allclose(D.frame_of(rec["v_t"], t), cines[i][..., t], atol=0.5 / 255)


def test_frame_records_are_compressed_and_corruption_is_a_data_error(tmp_path):
    """The companion file is zstd'd per record (raw npz members inside): a compressible cine shrinks, and flipped
    bytes surface as a DataError naming the frame record, not a crash or silent garbage."""
    import io
    import zipfile

    cine = np.zeros((256, 256, 8), np.float32)
    cine[90:150, 80:160] = np.linspace(0, 1, 8)  # mostly background, as a cardiac frame
    path = tmp_path / "z.array_record"
    D.write_arrayrecord(path, [{"pid": "s0", "v_t": cine}], quantize=("v_t",), frames=("v_t",), frame_records=True)
    frames = D.frames_path(path)
    assert frames.stat().st_size < cine.size // 2  # uint8 raw: cine.size bytes (the file pads to 64 kB blocks)
    src = D.ArrayRecordSource(path)
    np.testing.assert_allclose(D.frame_of(src[0]["v_t"], 5), cine[..., 5], atol=0.5 / 255)
    members = zipfile.ZipFile(io.BytesIO(src._frames[0][5])).infolist()  # the npz inside: stored, not deflated
    assert members and all(m.compress_type == zipfile.ZIP_STORED for m in members)
    data = bytearray(frames.read_bytes())
    for i in range(200, len(data) - 200, 997):
        data[i] ^= 0xFF
    frames.write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot read frame record"):
        rec = D.ArrayRecordSource(path)[0]
        for t in range(8):
            D.frame_of(rec["v_t"], t)


def test_make_source_dispatch(tmp_path):
    D.write_arrayrecord(tmp_path / "train.array_record", _records(3))
    src = D.make_source({"source": "arrayrecord", "path": str(tmp_path)}, "train")
    assert len(src) == 3
    src = D.make_source({"source": "arrayrecord", "path": str(tmp_path / "{split}.array_record")}, "train")
    assert len(src) == 3
    with pytest.raises(DataError, match="val.array_record"):
        D.make_source({"source": "arrayrecord", "path": str(tmp_path)}, "val")
    with pytest.raises(ConfigError, match="data.source='nope'"):
        D.make_source({"source": "nope"}, "train")
    with pytest.raises(ConfigError, match="data.root is required"):
        D.make_source({"source": "cinema_layout"}, "train")
    syn = D.make_source({"source": "synthetic", "n_subjects": {"train": 4, "val": 2}, "seed": 3}, "val")
    assert len(syn) == 2 and syn[1] == {"seed": 3, "index": 1_000_001}
    assert repr(syn) == "SyntheticIndexSource(n_subjects=2, seed=3, offset=1000000)"


def test_write_synthetic_dataset(tmp_path):
    pytest.importorskip("cinema_jax.data.phantom")
    counts = D.write_synthetic_dataset(tmp_path / "synth", n_subjects=3, seed=5)
    assert counts == {"train": 2, "val": 1}
    train = D.ArrayRecordSource(tmp_path / "synth/train.array_record")
    rec = train[1]
    assert rec["pid"] == "synth_5_000001"
    assert rec["sax_ed"].shape == (192, 192, 16) and rec["sax_ed"].dtype == np.float32
    assert rec["sax_es_gt"].dtype == np.uint8 and set(np.unique(rec["sax_ed_gt"])) <= {0, 1, 2, 3}
    assert rec["lax_4c_ed"].shape == (256, 256) and rec["lax_4c_ed_landmarks"].shape == (3, 2)
    assert rec["lv_edv"] > rec["lv_esv"] > 0 and 0 < rec["lv_ef"] < 100
    assert 0 <= rec["es_frame"] and rec["phenotype_name"] in ("NOR", "DCM", "HCM", "MINF", "ARV")
    # the same keys a CinemaLayoutSource item has, so one transform serves both
    for key in ("sax_ed", "sax_es", "sax_ed_gt", "sax_es_gt", "sax_spacing", "pid", "lv_ef"):
        assert key in rec
    # deterministic: same seed/index -> same record
    again = D.synthetic_record(5, 1, views=("sax",))
    np.testing.assert_allclose(again["sax_ed"], rec["sax_ed"], atol=1 / 255)
    with pytest.raises(CinemaError, match="exists"):
        D.write_synthetic_dataset(tmp_path / "synth", n_subjects=2)
    cfg = phantom_lib.PhantomConfig(sax_size=(24, 24), n_slices=3, lax_size=(20, 20), n_frames=5)
    D.write_synthetic_dataset(tmp_path / "cine", n_subjects=2, seed=5, cfg=cfg, views=("sax", "lax_4c"), cine=True)
    assert (tmp_path / "cine/train.frames.array_record").is_file()
    rec = D.ArrayRecordSource(tmp_path / "cine/train.array_record")[0]
    assert isinstance(rec["sax_t"], D.FrameStack) and rec["sax_t"].shape == (24, 24, 3, 5)
    ed = int(rec["ed_frame"])
    np.testing.assert_array_equal(D.frame_of(rec["sax_t"], ed), rec["sax_ed"])


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
    D.prepare("acdc", tmp_path / "raw", tmp_path / "processed", val_fraction=0.0)
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
        D.prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_acdc_info_cfg_frame_0_and_parse_errors(tmp_path):
    _fake_acdc(tmp_path / "raw", n=1, testing=0)
    cfg = tmp_path / "raw/database/training/patient001/Info.cfg"
    cfg.write_text("ED: 0\nES: 7\n")
    with pytest.raises(DataError, match=r"Info.cfg: ED 0 / ES 7 must be >= 1 \(ACDC frames are 1-based\)"):
        D.prepare("acdc", tmp_path / "raw", tmp_path / "out")
    cfg.write_text("ED: 1\nthis line has no colon\n")
    with pytest.raises(DataError, match="Info.cfg: cannot parse") as err:
        D.prepare("acdc", tmp_path / "raw", tmp_path / "out")
    assert "\n" not in str(err.value)  # configparser's message spans lines; the CLI prints one
    assert not (tmp_path / "out").exists()


def test_pack_layout_refuses_empty_views_and_names_the_flag(tmp_path):
    _fake_acdc(tmp_path / "raw", n=1, testing=0)
    D.prepare("acdc", tmp_path / "raw", tmp_path / "lay", val_fraction=0.0)
    with pytest.raises(ConfigError, match="no views to pack"):
        D.pack_layout(tmp_path / "lay", tmp_path / "p", views=())
    with pytest.raises(DataError, match=r"patient001_sax_t.nii.gz: file not found \(layouts made by `data prepare` "
                                        r"have ED/ES but no cine files: pack them with --no-cine\)"):
        D.pack_layout(tmp_path / "lay", tmp_path / "p", views=("sax",))
    assert not (tmp_path / "p").exists()
    assert D.pack_layout(tmp_path / "lay", tmp_path / "p", views=("sax",), cine=False)["train"] == 1
