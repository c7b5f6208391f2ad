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


def test_evaluate_reports_noisy_baseline():
    c = get_config("smoke")
    model = TASK.make_model(c)
    ex = TASK.example_batch(c, 1)
    params = jax.jit(lambda: model.init({"params": jax.random.key(0)}, ex["image"]))()["params"]
    batches = list(TASK.eval_batches(c, "val", batch_size=2))[:1]
    m = TASK.evaluate(model, params, batches, c)
    assert {"psnr", "ssim", "psnr_noisy", "ssim_noisy", "psnr_gain"} <= set(m)
    assert 0 < m["psnr_noisy"] < 40
