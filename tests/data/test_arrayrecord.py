"""ArrayRecord records (round trip, cine frame by frame, companion frame files), the config dispatch of sources, and
the phantom written as an ArrayRecord dataset."""

import numpy as np
import pytest

from cinema_jax.data import phantom as phantom_lib
from cinema_jax.data.arrayrecord import (
    ArrayRecordSource,
    FrameStack,
    decode_record,
    encode_record,
    frame_of,
    frames_path,
    write_arrayrecord,
)
from cinema_jax.data.sources import make_source
from cinema_jax.data.synthetic import synthetic_record, write_synthetic_dataset
from cinema_jax.errors import CinemaError, ConfigError, DataError


def _records(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"pid": f"s{i}", "image": rng.random((6, 5, 2)).astype(np.float32), "label": np.full((3,), i, np.uint8),
               "ef": 55.5 + i, "n": i, "site": {"name": "A", "noise": np.float32(0.1)}}


def test_arrayrecord_roundtrip_and_grain(tmp_path):
    import grain

    path = tmp_path / "train.array_record"
    assert write_arrayrecord(path, _records(5), quantize=("image",)) == 5
    src = ArrayRecordSource(path)
    assert len(src) == 5 and repr(src) == repr(ArrayRecordSource(str(path)))
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
    write_arrayrecord(exact, _records(2))
    np.testing.assert_array_equal(ArrayRecordSource(exact)[1]["image"], ref[1]["image"])
    both = ArrayRecordSource([path, exact])
    assert len(both) == 7 and both[5]["pid"] == "s0"
    assert len(ArrayRecordSource(tmp_path)) == 7  # a directory = all its files
    ds = grain.MapDataset.source(src).shuffle(seed=1).map(lambda r: r["label"]).batch(2, drop_remainder=True)
    batches = list(ds)
    assert len(batches) == 2 and batches[0].shape == (2, 3)


def test_arrayrecord_errors_and_atomic(tmp_path):
    with pytest.raises(DataError, match="missing.array_record.*not found"):
        ArrayRecordSource(tmp_path / "missing.array_record")
    junk = tmp_path / "junk.array_record"
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DataError, match="junk.array_record"):
        src = ArrayRecordSource(junk)
        src[0]

    def failing():
        yield from _records(2)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_arrayrecord(tmp_path / "half.array_record", failing())
    assert not any(p.name.startswith(".half") or p.name == "half.array_record" for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="cannot decode"):
        decode_record(b"not an npz", "x")
    with pytest.raises(ValueError, match="not an array"):
        encode_record({"bad": object()})


@pytest.mark.parametrize("frame_records", [False, True])
def test_cine_stored_per_frame_decodes_one_frame(tmp_path, monkeypatch, frame_records):
    import pickle

    rng = np.random.default_rng(1)
    cines = [rng.random((6, 5, 3, 7)).astype(np.float32) for _ in range(3)]
    counts = rng.integers(0, 9, (4, 7)).astype(np.int16)
    path = tmp_path / "cine.array_record"
    recs = [{"pid": f"s{i}", "sax_t": c, "n": counts + i, "still": c[..., 0]} for i, c in enumerate(cines)]
    assert write_arrayrecord(path, recs, quantize=("sax_t",), frames=("sax_t", "n"),
                               frame_records=frame_records) == 3
    assert frames_path(path).is_file() == frame_records
    src = ArrayRecordSource(tmp_path)  # a directory: the companion is not a dataset file of its own
    assert len(src) == 3 and src.paths == (str(path),)
    for i in (2, 0, 1):  # any order: each record finds its own frames
        rec = src[i]
        stack, ints = rec["sax_t"], rec["n"]
        assert isinstance(stack, FrameStack) and stack.shape == (6, 5, 3, 7) and stack.ndim == 4
        assert stack.dtype == np.float32 and ints.dtype == np.int16 and np.ndim(stack) == 4
        np.testing.assert_allclose(np.asarray(stack), cines[i], atol=0.5 / 255)
        np.testing.assert_array_equal(np.asarray(ints), counts + i)
        np.testing.assert_allclose(frame_of(stack, 4), cines[i][..., 4], atol=0.5 / 255)
        np.testing.assert_allclose(frame_of(stack, -1), cines[i][..., 6], atol=0.5 / 255)
        np.testing.assert_allclose(rec["still"], cines[i][..., 0])
    np.testing.assert_array_equal(frame_of(cines[0], 2), cines[0][..., 2])  # plain arrays too
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
            decode_record(src._sources[0][0])["sax_t"].frame(0)
        with pytest.raises(ValueError, match="different frame counts"):
            write_arrayrecord(tmp_path / "bad.array_record", [{"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}],
                                frames=("a", "b"), frame_records=True)
        assert not (tmp_path / "bad.array_record").exists() and not frames_path(tmp_path / "bad").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.array_record", "cine.frames.array_record"]
    with pytest.raises(ValueError, match="must not contain"):
        encode_record({"a@t": np.zeros(2)})
    with pytest.raises(ValueError, match="last axis"):
        encode_record({"v": np.zeros(3)}, frames=("v",))


def test_frame_records_across_several_files(tmp_path):
    rng = np.random.default_rng(2)
    cines = [rng.random((4, 3, 2 + i)).astype(np.float32) for i in range(5)]  # different lengths per subject
    write_arrayrecord(tmp_path / "a.array_record", [{"pid": f"s{i}", "v_t": cines[i]} for i in range(2)],
                        quantize=("v_t",), frames=("v_t",), frame_records=True)
    write_arrayrecord(tmp_path / "b.array_record", [{"pid": f"s{i}", "v_t": cines[i]} for i in range(2, 5)],
                        quantize=("v_t",), frames=("v_t",), frame_records=True)
    src = ArrayRecordSource([tmp_path / "a.array_record", tmp_path / "b.array_record"])
    assert len(src) == 5 and len(ArrayRecordSource(tmp_path)) == 5
    for i in (4, 1, 3, 0, 2, -1):
        rec = src[i]
        assert rec["pid"] == f"s{i % 5}" and rec["v_t"].shape == cines[i].shape
        t = cines[i].shape[-1] - 1
        np.testing.assert_allclose(frame_of(rec["v_t"], t), cines[i][..., t], atol=0.5 / 255)


def test_frame_records_are_compressed_and_corruption_is_a_data_error(tmp_path):
    """The companion file is zstd'd per record (raw npz members inside): a compressible cine shrinks, and flipped
    bytes surface as a DataError naming the frame record, not a crash or silent garbage."""
    import io
    import zipfile

    cine = np.zeros((256, 256, 8), np.float32)
    cine[90:150, 80:160] = np.linspace(0, 1, 8)  # mostly background, as a cardiac frame
    path = tmp_path / "z.array_record"
    write_arrayrecord(path, [{"pid": "s0", "v_t": cine}], quantize=("v_t",), frames=("v_t",), frame_records=True)
    frames = frames_path(path)
    assert frames.stat().st_size < cine.size // 2  # uint8 raw: cine.size bytes (the file pads to 64 kB blocks)
    src = ArrayRecordSource(path)
    np.testing.assert_allclose(frame_of(src[0]["v_t"], 5), cine[..., 5], atol=0.5 / 255)
    members = zipfile.ZipFile(io.BytesIO(src._frames[0][5])).infolist()  # the npz inside: stored, not deflated
    assert members and all(m.compress_type == zipfile.ZIP_STORED for m in members)
    data = bytearray(frames.read_bytes())
    for i in range(200, len(data) - 200, 997):
        data[i] ^= 0xFF
    frames.write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot read frame record"):
        rec = ArrayRecordSource(path)[0]
        for t in range(8):
            frame_of(rec["v_t"], t)


def test_make_source_dispatch(tmp_path):
    write_arrayrecord(tmp_path / "train.array_record", _records(3))
    src = make_source({"source": "arrayrecord", "path": str(tmp_path)}, "train")
    assert len(src) == 3
    src = make_source({"source": "arrayrecord", "path": str(tmp_path / "{split}.array_record")}, "train")
    assert len(src) == 3
    with pytest.raises(DataError, match="val.array_record"):
        make_source({"source": "arrayrecord", "path": str(tmp_path)}, "val")
    with pytest.raises(ConfigError, match="data.source='nope'"):
        make_source({"source": "nope"}, "train")
    with pytest.raises(ConfigError, match="data.root is required"):
        make_source({"source": "cinema_layout"}, "train")
    syn = make_source({"source": "synthetic", "n_subjects": {"train": 4, "val": 2}, "seed": 3}, "val")
    assert len(syn) == 2 and syn[1] == {"seed": 3, "index": 1_000_001}
    assert repr(syn) == "SyntheticIndexSource(n_subjects=2, seed=3, offset=1000000)"


def test_write_synthetic_dataset(tmp_path):
    pytest.importorskip("cinema_jax.data.phantom")
    counts = write_synthetic_dataset(tmp_path / "synth", n_subjects=3, seed=5)
    assert counts == {"train": 2, "val": 1}
    train = ArrayRecordSource(tmp_path / "synth/train.array_record")
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
    again = synthetic_record(5, 1, views=("sax",))
    np.testing.assert_allclose(again["sax_ed"], rec["sax_ed"], atol=1 / 255)
    with pytest.raises(CinemaError, match="exists"):
        write_synthetic_dataset(tmp_path / "synth", n_subjects=2)
    cfg = phantom_lib.PhantomConfig(sax_size=(24, 24), n_slices=3, lax_size=(20, 20), n_frames=5)
    write_synthetic_dataset(tmp_path / "cine", n_subjects=2, seed=5, cfg=cfg, views=("sax", "lax_4c"), cine=True)
    assert (tmp_path / "cine/train.frames.array_record").is_file()
    rec = ArrayRecordSource(tmp_path / "cine/train.array_record")[0]
    assert isinstance(rec["sax_t"], FrameStack) and rec["sax_t"].shape == (24, 24, 3, 5)
    ed = int(rec["ed_frame"])
    np.testing.assert_array_equal(frame_of(rec["sax_t"], ed), rec["sax_ed"])
