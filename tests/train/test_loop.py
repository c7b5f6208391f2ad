"""The training loop on a small real task: mesh invariance, accumulation, resume, best/eval, init/freeze."""

import json

import jax
import numpy as np
import pytest
from train_toy_task import toy_config

from cinema_jax.train import checkpoint as ckpt
from cinema_jax.train.logging import read_metrics
from cinema_jax.train.loop import evaluate_workdir, train


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


def final_params(workdir):
    params, _ = ckpt.load_params(workdir / "checkpoints" / str(ckpt.latest_step_dir(workdir).name))
    return params


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(p))


def test_metrics_contract_and_checkpoints(tmp_path):
    summary = train(toy_config({"log_every": 3}), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "images_per_s", "data_wait_frac", "mae"} <= set(r)
        assert 0.0 <= r["data_wait_frac"] <= 1.0
    assert summary["step"] == 12
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "toy_regress"
    assert (tmp_path / "tensorboard").is_dir()


def test_data_wait_frac_flags_a_slow_input_pipeline(tmp_path, monkeypatch):
    # 30 ms per sample against a sub-millisecond step: after the first window (which holds the compile), the loop
    # waits on data nearly all the time
    monkeypatch.setenv("TOY_SAMPLE_DELAY", "0.03")
    train(toy_config({"log_every": 4, "total_steps": 12}), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert min(r["data_wait_frac"] for r in rows[1:]) > 0.7


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory):
    return losses_of(tmp_path_factory.mktemp("ref"), (1, 1, 1))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_same_losses_on_every_mesh(tmp_path, mesh, reference_curve):
    got = losses_of(tmp_path / "m", mesh)
    assert [s for s, _ in got] == [s for s, _ in reference_curve]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in reference_curve], rtol=1e-4)


def losses_of(workdir, mesh):
    d, f, t = mesh
    train(toy_config({"mesh": {"data": d, "fsdp": f, "tensor": t}, "total_steps": 6}), workdir)
    return losses(workdir)


def test_grad_accum_matches_full_batch(tmp_path):
    # without dropout the mean of micro-batch gradients is the full-batch gradient
    base = {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "total_steps": 6, "model.dropout": 0.0}
    train(toy_config(base), tmp_path / "a")
    train(toy_config({**base, "grad_accum": 2}), tmp_path / "b")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 6
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-4)


def test_resume_gives_same_params(tmp_path):
    import shutil

    cfg = toy_config({"keep_checkpoints": 5})
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part")
    # roll the second run back to its step-4 checkpoint (as if killed after it), then re-run the same config
    for step in (8, 12):
        shutil.rmtree(tmp_path / "part" / "checkpoints" / str(step))
    summary = train(cfg, tmp_path / "part")
    assert summary["step"] == 12
    assert_trees_close(final_params(tmp_path / "full"), final_params(tmp_path / "part"))
    np.testing.assert_allclose(losses(tmp_path / "part"), losses(tmp_path / "full"), rtol=1e-5)
    assert [r["step"] for r in read_metrics(tmp_path / "part")] == list(range(1, 13))


def test_eval_best_and_evaluate_workdir(tmp_path):
    train(toy_config({"eval_every": 4}), tmp_path)
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    evals = [r for r in read_metrics(tmp_path) if "eval/mse" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert best["mse"] == pytest.approx(min(r["eval/mse"] for r in evals))
    params, config = ckpt.load_params(tmp_path)
    assert config.task == "toy_regress"
    out = evaluate_workdir(tmp_path, "test")
    assert json.loads((tmp_path / "eval_test.json").read_text())["mse"] == pytest.approx(out["mse"])


def test_early_stopping(tmp_path):
    # min_delta 100: nothing after the first eval counts as an improvement -> stop after `patience` bad evals
    cfg = toy_config({"eval_every": 2, "total_steps": 40, "early_stopping.patience": 2,
                      "early_stopping.min_delta": 100.0})
    summary = train(cfg, tmp_path)
    assert summary["stopped"] and summary["step"] == 6


def test_init_from_and_freeze_encoder(tmp_path):
    train(toy_config({"total_steps": 4}), tmp_path / "pre")
    pre, _ = ckpt.load_params(tmp_path / "pre")
    cfg = toy_config({"total_steps": 3, "init_from": str(tmp_path / "pre"), "freeze_encoder": True, "seed": 5})
    train(cfg, tmp_path / "ft")
    ft = final_params(tmp_path / "ft")
    assert_trees_close(ft["encoder"], pre["encoder"], rtol=0, atol=0)
    assert not np.allclose(ft["head"]["kernel"], pre["head"]["kernel"])


def test_load_params_errors(tmp_path):
    from cinema_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.load_params(tmp_path / "empty")


def test_save_load_params_round_trip(tmp_path):
    params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(3, np.float32)}
    ckpt.save_params(tmp_path / "exp", params, {"task": "x", "model": {"size": "tiny"}})
    got, cfg = ckpt.load_params(tmp_path / "exp")
    assert_trees_close(got, params, rtol=0, atol=0)
    assert cfg.model.size == "tiny"
