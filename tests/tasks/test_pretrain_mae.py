"""MAE pretraining on prepared records (ArrayRecord cine / ED-ES, NIfTI layout) as well as the phantom."""

import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.data import synthetic
from cinema_jax.errors import CinemaError, ConfigError, DataError
from cinema_jax.tasks.pretrain_mae import PretrainMAE, phantom_config

TASK = PretrainMAE()


def smoke(**over):
    return load_config("configs/mae_pretrain.py:smoke", [f"{k}={v}" for k, v in over.items()])


def no_zoom(cfg):
    cfg.data.zoom_prob = 0.0
    return cfg


def test_cine_records_match_the_phantom_frame(tmp_path):
    """An ArrayRecord written from the phantom (uint8 on disk) gives the sample the phantom renders on the fly."""
    cfg = smoke()
    synthetic.write_synthetic_dataset(tmp_path / "ds", n_subjects=3, seed=7, cfg=phantom_config(cfg), cine=True)
    rec_cfg = smoke(**{"data.source": "arrayrecord", "data.path": str(tmp_path / "ds")})
    src = TASK.source(rec_cfg, "train")
    assert len(src) == 2 and len(TASK.source(rec_cfg, "val")) == 1
    got = TASK.transform(src[1], np.random.default_rng(0), rec_cfg, train=False)
    want = TASK.transform({"seed": 7, "index": 1}, np.random.default_rng(0), cfg, train=False)
    assert set(got) == set(want) == {"sax", "lax_2c", "lax_3c", "lax_4c"}
    for view in want:
        assert got[view].shape == want[view].shape and got[view].dtype == np.float32
        np.testing.assert_allclose(got[view], want[view], atol=0.01, err_msg=view)  # uint8 quantisation
    # train: a random frame, the same for the phantom path and the record path given the same rng stream
    got = TASK.transform(src[1], np.random.default_rng(3), no_zoom(rec_cfg), train=True)
    want = TASK.transform({"seed": 7, "index": 1}, np.random.default_rng(3), no_zoom(cfg), train=True)
    t = int(np.random.default_rng(3).integers(cfg.data.n_frames))
    assert t != 0
    np.testing.assert_allclose(got["sax"], want["sax"], atol=0.01)
    assert np.abs(got["sax"] - TASK.transform(src[1], None, rec_cfg, train=False)["sax"]).max() > 0.05


def _marker_record(n_frames=(8, 8, 8, 8), spacing_scale=1.0):
    """Frame t of every view holds one bright pixel at x = t: the sample shows which frame each view came from."""
    rec = {"pid": "marker"}
    for view, n in zip(("sax", "lax_2c", "lax_3c", "lax_4c"), n_frames):
        shape = (32, 32, 4) if view == "sax" else (32, 32)
        cine = np.zeros(shape + (n,), np.float32)
        for t in range(n):
            cine[(t, 5) + (slice(None),) * (len(shape) - 2) + (t,)] = 1.0
        rec[f"{view}_t"] = cine
        base = (6.0, 6.0, 20.0) if view == "sax" else (8.0, 8.0)
        rec[f"{view}_spacing"] = np.asarray(base, np.float32) * spacing_scale
    return rec


def test_every_view_gets_the_same_random_frame():
    cfg = no_zoom(smoke(**{"data.source": "arrayrecord"}))
    frames = set()
    for seed in range(6):
        out = TASK.transform(_marker_record(), np.random.default_rng(seed), cfg, train=True)
        picked = {v: int(np.unravel_index(np.argmax(a), a.shape)[0]) for v, a in out.items()}
        assert len(set(picked.values())) == 1, picked
        frames |= set(picked.values())
    assert len(frames) > 2  # random over the cycle, not a fixed frame
    out = TASK.transform(_marker_record(), None, cfg, train=False)
    assert int(np.unravel_index(np.argmax(out["lax_4c"]), out["lax_4c"].shape)[0]) == 0


def test_ed_es_records_and_spacing_resampled():
    cfg = no_zoom(smoke(**{"data.source": "cinema_layout"}))
    rec = {"pid": "p"}
    for view in ("sax", "lax_2c", "lax_3c", "lax_4c"):
        shape = (16, 16, 4) if view == "sax" else (16, 16)
        ed, es = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        ed[6:10, 6:10] = 1.0  # 4 px square
        es[7:9, 7:9] = 1.0
        rec[f"{view}_ed"], rec[f"{view}_es"] = ed, es
        # twice the configured spacing: the square is 8 configured pixels wide after resampling
        rec[f"{view}_spacing"] = np.asarray((12.0, 12.0, 20.0) if view == "sax" else (16.0, 16.0), np.float32)
    out = TASK.transform(rec, None, cfg, train=False)  # eval: ED
    for view, img in out.items():
        assert img.shape[:2] == (32, 32), view
        section = img[:, 16, 0, 0] if view == "sax" else img[:, 16, 0]
        assert (section > 0.5).sum() == 8, (view, section)
    phases = {int((TASK.transform(rec, np.random.default_rng(s), cfg, True)["lax_4c"] > 0.5).sum())
              for s in range(8)}
    assert phases == {64, 16}  # ED (8x8 after resampling) and ES (4x4) both drawn


def test_sax_is_cropped_centred_in_plane_and_at_the_end_in_depth():
    cfg = no_zoom(smoke(**{"data.source": "arrayrecord", "data.views": "('sax',)"}))
    ed = np.zeros((40, 40, 6), np.float32)
    ed[20, 20, :] = 1.0  # centre column
    ed[0, 0, 5] = 0.5  # a corner of a slice past the 4 kept
    rec = {"pid": "big", "sax_ed": ed, "sax_es": ed, "sax_spacing": np.asarray((6.0, 6.0, 20.0), np.float32)}
    out = TASK.transform(rec, None, cfg, train=False)["sax"][..., 0]
    assert out.shape == (32, 32, 4)
    assert np.argwhere(out == 1.0).tolist() == [[16, 16, z] for z in range(4)]
    assert (out == 0.5).sum() == 0


def test_bad_records_and_config_get_clear_errors():
    cfg = smoke(**{"data.source": "arrayrecord"})
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="different frame counts"):
        TASK.transform(_marker_record((8, 8, 6, 8)), rng, cfg, True)
    rec = _marker_record()
    rec["sax_t"][0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        TASK.transform(rec, None, cfg, False)
    rec = _marker_record()
    rec["sax_t"] = rec["sax_t"][:, :, 0]
    with pytest.raises(DataError, match=r"'sax_t' must be \(x, y, z, t\)"):
        TASK.transform(rec, None, cfg, False)
    rec = {k: v for k, v in _marker_record().items() if not k.startswith("lax_3c")}
    with pytest.raises(DataError, match="lax_3c_ed"):
        TASK.transform(rec, None, cfg, False)
    with pytest.raises(ConfigError, match="data.path is required"):
        TASK.source(cfg, "train")
    with pytest.raises(ConfigError, match="unknown for pretraining"):
        TASK.source(smoke(**{"data.source": "sunnybrook"}), "train")


def _write_layout(root, splits=(("train", ("p1", "p2")), ("val", ("p3",))), n_frames=(6, 6, 6, 6), float_scale=None):
    """A CineMA processed layout at smoke sizes: uint8 ED/ES and cine '<pid>_<view>_t' files (LAX stored x, y, 1, t),
    or float32 files scaled by `float_scale`."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    for split, pids in splits:
        (root / f"{split}_metadata.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_metadata.csv").write_text("pid,n_frames\n" + "".join(f"{p},{n_frames[0]}\n" for p in pids))
        for pid in pids:
            (root / split / pid).mkdir(parents=True)
            for view, nt in zip(("sax", "lax_2c", "lax_3c", "lax_4c"), n_frames):
                shape = (32, 32, 4) if view == "sax" else (32, 32, 1)
                zooms = (6.0, 6.0, 20.0) if view == "sax" else (8.0, 8.0, 1.0)
                cine = rng.integers(0, 256, shape + (nt,)).astype(np.uint8)
                files = {"t": cine, "ed": cine[..., 0], "es": cine[..., nt // 2]}
                for phase, arr in files.items():
                    if float_scale is not None:
                        arr = arr.astype(np.float32) / 255.0 * float_scale
                    img = nib.Nifti1Image(arr, np.diag(list(zooms) + [1.0]))
                    img.header.set_zooms(zooms + ((30.0,) if arr.ndim == 4 else ()))
                    nib.save(img, root / split / pid / f"{pid}_{view}_{phase}.nii.gz")
    return root


def test_configure_names_the_schedule_of_a_record_dataset(tmp_path, capsys):
    root = _write_layout(tmp_path / "layout")
    cfg = smoke(**{"data.source": "cinema_layout", "data.root": str(root)})  # 2 train subjects, batch 8, 8 epochs
    TASK.configure(cfg)
    err = capsys.readouterr().err
    assert "pretraining on 2 training records" in err and "--config.total_steps=8 --config.optim.warmup_steps=1" in err
    TASK.configure(smoke(**{"data.source": "cinema_layout", "data.root": str(root), "total_steps": 5}))
    TASK.configure(smoke())
    assert capsys.readouterr().err == ""  # set explicitly / the phantom: nothing to say


def test_layout_source_for_pretraining(tmp_path):
    root = _write_layout(tmp_path / "layout")
    cfg = no_zoom(smoke(**{"data.source": "cinema_layout", "data.root": str(root)}))
    src = TASK.source(cfg, "train")
    assert len(src) == 2 and len(TASK.source(cfg, "val")) == 1
    out = TASK.transform(src[0], np.random.default_rng(0), cfg, True)
    assert out["sax"].shape == (32, 32, 4, 1) and out["lax_2c"].shape == (32, 32, 1)
    assert out["sax"].min() == 0.0 and out["sax"].max() == 1.0
    # cine files: a random frame t, the same for every view
    cine_cfg = no_zoom(smoke(**{"data.source": "cinema_layout", "data.root": str(root), "data.cine": True}))
    rec = TASK.source(cine_cfg, "train")[1]
    assert "sax_ed" not in rec and rec["sax_t"].shape == (32, 32, 4, 6) and rec["lax_4c_t"].shape == (32, 32, 6)
    t = int(np.random.default_rng(5).integers(6))
    got = TASK.transform(rec, np.random.default_rng(5), cine_cfg, True)
    for view in ("sax", "lax_4c"):
        want = rec[f"{view}_t"][..., t]
        want = (want - want.min()) / (want.max() - want.min())
        np.testing.assert_allclose(got[view][..., 0], want, atol=1e-6)


def test_pack_layout_gives_the_same_samples(tmp_path):
    from cinema_jax.data.arrayrecord import FrameStack
    from cinema_jax.data.layout import pack_layout

    root = _write_layout(tmp_path / "layout")
    assert pack_layout(root, tmp_path / "packed", with_labels=False) == {"train": 2, "val": 1}
    assert (tmp_path / "packed" / "train.frames.array_record").is_file()
    layout_cfg = smoke(**{"data.source": "cinema_layout", "data.root": str(root), "data.cine": True})
    packed_cfg = smoke(**{"data.source": "arrayrecord", "data.path": str(tmp_path / "packed")})
    layout, packed = TASK.source(layout_cfg, "train"), TASK.source(packed_cfg, "train")
    rec = packed[1]
    assert isinstance(rec["sax_t"], FrameStack) and "sax_ed" in rec and "sax_ed_gt" not in rec
    for seed in range(3):  # zoom on: the same draws, the same arithmetic, uint8 data stored exactly
        a = TASK.transform(layout[1], np.random.default_rng(seed), layout_cfg, True)
        b = TASK.transform(rec, np.random.default_rng(seed), packed_cfg, True)
        for view in a:
            np.testing.assert_allclose(b[view], a[view], atol=1e-6, err_msg=view)
    with pytest.raises(CinemaError, match="exists"):
        pack_layout(root, tmp_path / "packed")


def test_pack_layout_refuses_what_uint8_would_corrupt(tmp_path):
    from cinema_jax.data.layout import pack_layout

    hot = _write_layout(tmp_path / "hot", splits=(("train", ("p1",)),), float_scale=300.0)
    with pytest.raises(DataError, match=r"p1_sax_ed.nii.gz: intensities span \[0, 300\]"):
        pack_layout(hot, tmp_path / "out", with_labels=False)
    ragged = _write_layout(tmp_path / "ragged", splits=(("train", ("p1",)),), n_frames=(6, 6, 5, 6))
    with pytest.raises(DataError, match="different frame counts"):
        pack_layout(ragged, tmp_path / "out", edes=False)
    with pytest.raises(DataError, match="not a CineMA layout"):
        pack_layout(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_record_stream_resumes_exactly_and_ignores_worker_count(tmp_path):
    """The Grain stream over frame records: a restored iterator state gives the same next batches, and 2 worker
    processes (records decoded there, FrameStacks never pickled) give the in-process batches."""
    from cinema_jax.data import pipeline

    synthetic.write_synthetic_dataset(tmp_path / "ds", n_subjects=7, seed=2, cfg=phantom_config(smoke()), cine=True)
    cfg = smoke(**{"data.source": "arrayrecord", "data.path": str(tmp_path / "ds"), "batch_size": 2})
    it = pipeline.train_iterator(TASK, cfg, worker_count=0)
    ref = [next(it) for _ in range(5)]  # 5 subjects per epoch: crosses into the second epoch
    it = pipeline.train_iterator(TASK, cfg, worker_count=0)
    next(it), next(it)
    fresh = pipeline.train_iterator(TASK, cfg, worker_count=0)
    fresh.set_state(it.get_state())
    workers = pipeline.train_iterator(TASK, cfg, worker_count=2)
    got = [next(workers) for _ in range(5)]
    for k, batch in enumerate([next(fresh), next(fresh)]):
        for view in batch:
            np.testing.assert_array_equal(batch[view], ref[2 + k][view])
    for a, b in zip(ref, got):
        for view in a:
            np.testing.assert_array_equal(b[view], a[view])
    assert not np.array_equal(ref[0]["sax"], ref[1]["sax"])


def test_pretraining_runs_on_an_arrayrecord_dataset(tmp_path):
    from cinema_jax.train.logging import read_metrics
    from cinema_jax.train.loop import train

    cfg = smoke()
    synthetic.write_synthetic_dataset(tmp_path / "ds", n_subjects=10, seed=1, cfg=phantom_config(cfg), cine=True)
    run = smoke(**{"data.source": "arrayrecord", "data.path": str(tmp_path / "ds"), "batch_size": 4,
                   "total_steps": 2, "log_every": 1, "eval_every": 2, "image_every": 0, "checkpoint_every": 0,
                   "mesh.data": 1, "data.views": "('sax', 'lax_4c')"})
    train(run, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and len(evals) == 1 and 0 < evals[0] < 1
