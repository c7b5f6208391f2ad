"""Denoise task: samples, loss, evaluation, and a smoke train that beats the noisy input on held-out data."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cinema_jax.tasks.denoise import TASK, combined_loss, quick_train  # noqa: E402
from configs.denoise import get_config, get_sweep  # noqa: E402


def test_transform_layout_and_determinism():
    c = get_config("smoke")
    rec = TASK.records(c, "train")[0]
    a = TASK.transform(rec, np.random.default_rng(3), c, True)
    b = TASK.transform(rec, np.random.default_rng(3), c, True)
    assert a["image"].shape == (32, 32, 8, 3) and a["target"].shape == (32, 32, 8, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"][..., 2].min() >= 1.0
    ev = TASK.transform(TASK.records(c, "val")[0], np.random.default_rng(0), c, False)
    assert ev["image"].shape == (64, 64, 8, 3)


def test_matrix_size_augmentation():
    c = get_config("smoke")
    rec = TASK.records(c, "train")[0]
    c.data.matrix_size_prob, c.data.matrix_size_ratios = 1.0, (0.25,)  # 64 -> 16 < crop 32: skipped
    skipped = TASK.transform(rec, np.random.default_rng(3), c, True)
    c.data.matrix_size_prob, c.data.matrix_size_ratios = 0.0, (1.0,)
    plain = TASK.transform(rec, np.random.default_rng(3), c, True)
    c.data.matrix_size_prob, c.data.matrix_size_ratios = 1.0, (1.5,)
    bigger = TASK.transform(rec, np.random.default_rng(3), c, True)
    for s in (skipped, bigger):
        assert s["image"].shape == (32, 32, 8, 3) and np.all(np.isfinite(s["image"]))
    assert skipped["clean"].shape == plain["clean"].shape
    # a 1.5x matrix (same FOV) shows the heart 1.5x larger in pixels: its clean crop is not the plain one
    assert np.abs(bigger["clean"] - plain["clean"]).max() > 0.1 * np.abs(plain["clean"]).max()


def test_ablations_share_the_eval_samples():
    c = get_config("smoke")
    rec = TASK.records(c, "val")[1]
    full = TASK.transform(rec, np.random.default_rng(5), c, False)
    c.noise.gmap_augment, c.noise.snr_unit = False, False
    abl = TASK.transform(rec, np.random.default_rng(5), c, False)
    np.testing.assert_array_equal(full["noisy"], abl["noisy"])
    assert np.all(abl["image"][..., 2] == 1.0)
    np.testing.assert_allclose(abl["image"][..., 0] * abl["scale"], full["image"][..., 0], rtol=1e-5, atol=1e-5)
    assert len(get_sweep()) == 3


def test_loss_is_zero_at_target_and_positive_elsewhere():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 16, 16, 8, 2)).astype(np.float32) * 5
    w = dict(mse=1.0, charbonnier=1.0, perpendicular=1.0, gaussian3d=1.0, ssim=1.0)
    zero, _ = combined_loss(t, t, w)
    other, parts = combined_loss(t + rng.normal(size=t.shape).astype(np.float32), t, w)
    assert float(zero) < 0.01 and float(other) > 0.5
    assert set(parts) == set(w)
    flipped, _ = combined_loss(-t, t, dict(perpendicular=1.0))
    assert float(flipped) > float(combined_loss(t * 1.1, t, dict(perpendicular=1.0))[0])


@pytest.mark.slow
def test_smoke_training_improves_psnr_over_noisy_input():
    c = get_config("smoke")
    model, params, losses = quick_train(c, steps=60)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    m = TASK.evaluate(model, params, TASK.eval_batches(c, "val"), c)
    assert m["psnr_gain"] > 1.0, m
    assert m["ssim"] > m["ssim_noisy"]


def test_noise_plan_samples_and_the_step_made_inputs():
    c = get_config("smoke")
    c.noise.on_device = True
    rec = TASK.records(c, "train")[0]
    a = TASK.transform(rec, np.random.default_rng(3), c, True)
    b = TASK.transform(rec, np.random.default_rng(3), c, True)
    ex = TASK.example_batch(c, 1)
    assert set(a) == set(ex)
    for k in a:
        assert a[k].shape == ex[k].shape[1:] and a[k].dtype == ex[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k])
    assert a["clean"].shape == (32, 32, 8, 2) and a["noise_lx"].shape == (32, 32) and a["gmap"].min() >= 1.0
    assert 0 < float(a["noise_std"]) <= 1.0  # SNR units with a noise-free phantom: sigma / sigma
    ev = TASK.transform(TASK.records(c, "val")[0], np.random.default_rng(0), c, False)
    assert ev["image"].shape == (64, 64, 8, 3)  # evaluation keeps the host's fixed samples
    batch = {k: np.stack([TASK.transform(r, np.random.default_rng(i), c, True)[k] for i, r in
                          enumerate(TASK.records(c, "train")[:2])]) for k in a}
    model = TASK.make_model(c)
    params = jax.jit(lambda: model.init({"params": jax.random.key(0)}, **TASK.model_inputs(batch)))()["params"]
    loss, parts = jax.jit(lambda p, k: TASK.loss(model, p, batch, k, True))(params, jax.random.key(1))
    again, _ = jax.jit(lambda p, k: TASK.loss(model, p, batch, k, True))(params, jax.random.key(1))
    other, _ = jax.jit(lambda p, k: TASK.loss(model, p, batch, k, True))(params, jax.random.key(2))
    assert np.isfinite(float(loss)) and float(loss) == float(again) and float(loss) != float(other)


@pytest.mark.slow
def test_smoke_training_with_noise_on_device_improves_psnr():
    c = get_config("smoke")
    c.noise.on_device = True
    model, params, losses = quick_train(c, steps=60)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    m = TASK.evaluate(model, params, TASK.eval_batches(c, "val"), c)
    assert m["psnr_gain"] > 1.0, m


def test_evaluate_reports_noisy_baseline():
    c = get_config("smoke")
    model = TASK.make_model(c)
    ex = TASK.example_batch(c, 1)
    params = jax.jit(lambda: model.init({"params": jax.random.key(0)}, ex["image"]))()["params"]
    batches = list(TASK.eval_batches(c, "val", batch_size=2))[:1]
    m = TASK.evaluate(model, params, batches, c)
    assert {"psnr", "ssim", "psnr_noisy", "ssim_noisy", "psnr_gain"} <= set(m)
    assert 0 < m["psnr_noisy"] < 40


# ================================================================================== real cases (data.source h5)
def _write_h5(path, n_cases=3, shape=(40, 36, 6), n_gmaps=2, gmap_t=1, image_dtype=np.complex64):
    """Reference-style HDF5: /<group>/<case>/{image, gmap}; g-map n of every case is constant 1.5 + n."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(n_cases):
            img = rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + 20.0
            g = f.create_group(f"scanner{i % 2}/case{i}")
            g["image"] = img.astype(image_dtype) if image_dtype != np.float32 else np.abs(img).astype(np.float32)
            if n_gmaps:
                maps = np.ones(shape[:2] + (gmap_t, n_gmaps), np.float32) * (1.5 + np.arange(n_gmaps))
                g["gmap"] = maps
    return path


def h5_config(path, **over):
    c = get_config("h5")
    c.data.path = str(path)
    c.data.crop, c.data.eval_crop = (32, 32, 8), (32, 32, 8)
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _gmap_of(sample):
    """The g-map a training sample carries: its input's channel 2 (host noise) or its plan's 'gmap' (noise on the
    accelerator)."""
    return sample["image"][..., 2] if "image" in sample else sample["gmap"]


def _cut_out_shape(sample):
    return sample["image"].shape[:3] if "image" in sample else sample["clean"].shape[:3]


@pytest.mark.parametrize("on_device", [True, False])
def test_h5_cases_use_their_own_gmaps(tmp_path, on_device):
    from cinema_jax.data.h5cases import H5CaseSource

    (tmp_path / "train").mkdir()
    _write_h5(tmp_path / "train" / "a.h5")
    _write_h5(tmp_path / "val.h5", n_cases=1)
    c = h5_config(tmp_path, **{"noise.on_device": on_device})
    src = TASK.source(c, "train")
    assert len(src) == 3 and len(TASK.source(c, "val")) == 1
    assert [src[i]["case"] for i in range(3)] == ["scanner0/case0", "scanner0/case2", "scanner1/case1"]  # sorted
    rec = src[1]
    assert rec["image"].dtype == np.complex64 and rec["gmaps"].shape == (40, 36, 1, 2)
    seen = set()
    for seed in range(24):
        s = TASK.transform(rec, np.random.default_rng(seed), c, True)
        assert ("image" in s) != on_device
        assert _cut_out_shape(s) == (32, 32, 8)  # 6 frames repeated to the 8-frame cut-out
        g = _gmap_of(s)
        assert np.ptp(g) == 0  # the case's constant maps, not a drawn coil g-map
        seen.add(round(float(g.flat[0]), 3))
    assert seen == {1.0, 1.5, 2.5}  # map 0, map 1, or none (R = 1)
    ev = TASK.transform(rec, np.random.default_rng(0), c, False)
    assert np.all(ev["image"][..., 2] == 1.5)  # eval: the first map
    # SNR units with clean noise std 1: the added noise has std g * sigma / sqrt(sigma^2 + 1) per part
    assert c.noise.clean_noise_std == 1.0 and tuple(c.noise.snr_range) == ()
    assert repr(H5CaseSource([tmp_path / "val.h5"])).startswith("H5CaseSource(paths=")


def test_h5_small_images_magnitude_and_matrix_size(tmp_path):
    _write_h5(tmp_path / "train.h5", n_cases=1, shape=(24, 20, 4), n_gmaps=1, gmap_t=4, image_dtype=np.float32)
    c = h5_config(tmp_path, **{"data.matrix_size_prob": 0.0})
    rec = TASK.source(c, "train")[0]
    assert np.all(rec["image"].imag == 0)  # magnitude data: imaginary part 0
    padded = TASK.transform(rec, np.random.default_rng(1), c, True)  # 24x20 mirror-padded to the 32x32 cut-out
    c = h5_config(tmp_path, **{"data.matrix_size_prob": 1.0, "data.matrix_size_ratios": (1.5, 2.0)})
    resized = TASK.transform(rec, np.random.default_rng(1), c, True)  # only 2.0 (48x40) fits the cut-out
    for s in (padded, resized):
        assert _cut_out_shape(s) == (32, 32, 8) and all(np.all(np.isfinite(v)) for v in s.values())
        assert set(np.unique(np.round(_gmap_of(s), 4))) <= {1.0, 1.5}


def test_h5_gmap_is_flipped_with_the_image(tmp_path):
    h5py = pytest.importorskip("h5py")
    ramp = np.broadcast_to(1.0 + np.arange(32, dtype=np.float32)[:, None, None, None] / 8, (32, 32, 1, 1))
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["c/image"] = np.full((32, 32, 8), 10 + 0j, np.complex64)
        f["c/gmap"] = np.ascontiguousarray(ramp)
    c = h5_config(tmp_path, **{"data.matrix_size_prob": 0.0, "data.frame_shuffle_prob": 0.0})
    rec = TASK.source(c, "train")[0]
    directions = set()
    for seed in range(16):
        draws = np.random.default_rng(seed)
        flip_x = draws.random() < 0.5
        draws.random()
        if int(draws.integers(0, 2)) == 1:
            continue  # the R = 1 draw: no map to flip
        g = _gmap_of(TASK.transform(rec, np.random.default_rng(seed), c, True))[:, 0, 0]
        assert (np.diff(g) < 0).all() if flip_x else (np.diff(g) > 0).all()
        directions.add(flip_x)
    assert directions == {True, False}


def test_h5_bad_input_gets_clear_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    from cinema_jax.errors import ConfigError, DataError

    with pytest.raises(DataError, match="not found"):
        TASK.source(h5_config(tmp_path), "train")
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["c1/image"] = np.ones((8, 8, 2), np.complex64)
        f["c1/gmap"] = np.ones((8, 9, 1, 1), np.float32)
        f["c2/image"] = np.full((8, 8, 2), np.nan, np.float32)
        f["c3/image"] = np.ones((8, 8, 2), np.complex64)
        f["c3/gmap"] = np.zeros((8, 8, 1, 1), np.float32)
        f["c4/image"] = np.ones((8, 8, 2, 2), np.complex64)
    src = TASK.source(h5_config(tmp_path), "train")
    with pytest.raises(DataError, match="c1: 'gmap' must be"):
        src[0]
    with pytest.raises(DataError, match="c2: 'image' holds NaN"):
        src[1]
    with pytest.raises(DataError, match="c3: 'gmap' must be finite and positive"):
        src[2]
    with pytest.raises(DataError, match=r"c4: 'image' must be a numeric \(x, y, t\)"):
        src[3]
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot read HDF5"):
        TASK.source(h5_config(tmp_path / "junk.h5"), "train")
    c = get_config("smoke")
    c.data.source = "nifti"
    with pytest.raises(ConfigError, match="unknown for denoising"):
        TASK.source(c, "train")


def test_h5_denoiser_trains_end_to_end(tmp_path):
    from cinema_jax.train.logging import read_metrics
    from cinema_jax.train.loop import train

    _write_h5(tmp_path / "train.h5", n_cases=4, shape=(32, 32, 8))
    _write_h5(tmp_path / "val.h5", n_cases=1, shape=(32, 32, 8))
    c = h5_config(tmp_path)
    smoke = get_config("smoke")
    c.model, c.precision, c.batch_size, c.data.worker_count = smoke.model, "float32", 8, 0
    c.total_steps, c.log_every, c.eval_every, c.image_every, c.checkpoint_every = 2, 1, 2, 0, 0
    c.optim.warmup_steps = 1
    train(c, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("eval/psnr" in r for r in rows)
