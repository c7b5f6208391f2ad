"""Training that diverges stops, and never crowns NaN (issue 21, class 3).

Before: with a NaN loss the run went on, exited 0, and `best/` held all-NaN params chosen on a Dice of 0. Now a
non-finite loss or gradient norm is never applied to the params or optimizer state; `on_nonfinite=stop` (the
default) ends the run with one `error:` line naming the step, `skip` passes over the step and counts it; nothing
non-finite is ever saved, and an undefined eval metric never selects `best/`."""

import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy_task import toy_config  # noqa: E402

from cinema_jax.errors import CinemaError  # noqa: E402
from cinema_jax.train import checkpoint as ckpt  # noqa: E402
from cinema_jax.train.logging import read_metrics  # noqa: E402
from cinema_jax.train.loop import TrainingDiverged, _better, train  # noqa: E402


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def _nan_step(n=64, batch=16, index=5):
    """First training step (1-based) whose batch holds sample `index` (shuffle is a function of the seed only)."""
    from cinema_jax.data import pipeline
    from cinema_jax.tasks import get_task

    config = toy_config({"total_steps": 12})
    it = pipeline.train_iterator(get_task("toy_regress"), config, batch, 1)
    for step in range(1, 13):
        b = next(it)
        if np.isnan(b["y"]).any():
            return step
    raise AssertionError("the NaN sample never came")


def test_stop_names_the_step_and_saves_nothing_non_finite(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_NAN_INDEX", "5")
    bad = _nan_step()
    config = toy_config({"total_steps": 12, "checkpoint_every": 1, "eval_every": 1, "keep_checkpoints": 20})
    with pytest.raises(TrainingDiverged, match=rf"non-finite loss \(nan\).* at step {bad}\b") as e:
        train(config, tmp_path / "run")
    assert "on_nonfinite=skip" in str(e.value) and "\n" not in str(e.value)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(1, bad))  # every step before the bad one, none at or after it
    for s in steps:
        params, _ = ckpt.load_params(tmp_path / "run" / "checkpoints" / str(s))
        assert _all_finite(params)
    if (tmp_path / "run" / "best").exists():
        assert _all_finite(ckpt.load_params(tmp_path / "run" / "best")[0])
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)


def test_skip_counts_skips_and_keeps_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_NAN_INDEX", "5")
    config = toy_config({"total_steps": 12, "on_nonfinite": "skip", "eval_every": 4})
    out = train(config, tmp_path / "run")
    assert out["step"] == 12
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    skipped = [r["step"] for r in rows if not isinstance(r["loss"], float)]  # NaN is logged as the string 'nan'
    assert len(skipped) == 3  # the bad sample comes once per epoch: 12 steps x 16 = 3 epochs of 64
    assert rows[-1]["nonfinite_skips"] == 3
    assert [r["nonfinite_skips"] for r in rows] == [sum(s <= r["step"] for s in skipped) for r in rows]
    params, _ = ckpt.load_params(tmp_path / "run")
    assert _all_finite(params) and _all_finite(ckpt.load_params(ckpt.latest_step_dir(tmp_path / "run"))[0])


def test_a_skipped_step_leaves_params_and_optimizer_state_unchanged():
    from cinema_jax.data import pipeline
    from cinema_jax.train.loop import Setup

    config = toy_config({"on_nonfinite": "skip"})
    setup = Setup(config)
    with setup.context():
        state = setup.init_state()
        before = jax.device_get(state)
        step = setup.make_step()
        batch = pipeline.eval_batches(setup.task, config, "train")
        b = next(iter(batch))
        b = {k: np.asarray(v)[:16] for k, v in b.items()}
        b["y"] = b["y"].copy()
        b["y"][3] = np.nan
        from cinema_jax.train import sharding as shd

        new, metrics = step(state, shd.shard_batch(b, setup.batch_sharding))
        after = jax.device_get(new)
    assert float(metrics["nonfinite"]) == 1.0 and int(after["step"]) == 1
    for x, y in zip(jax.tree_util.tree_leaves(before["params"]) + jax.tree_util.tree_leaves(before["opt_state"]),
                    jax.tree_util.tree_leaves(after["params"]) + jax.tree_util.tree_leaves(after["opt_state"])):
        np.testing.assert_array_equal(x, y)


def test_too_many_skips_in_a_row_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_NAN_INDEX", ",".join(str(i) for i in range(64)))  # every sample
    with pytest.raises(TrainingDiverged, match=r"at step 10 \(10 steps in a row skipped\)"):
        train(toy_config({"total_steps": 12, "on_nonfinite": "skip"}), tmp_path / "run")
    # the checkpoints of skipped steps (4, 8) hold the untouched, finite state
    assert ckpt.latest_step_dir(tmp_path / "run").name == "8"
    assert _all_finite(ckpt.load_params(ckpt.latest_step_dir(tmp_path / "run"))[0])


def test_undefined_metrics_never_select_best():
    assert not _better(float("nan"), None, "max", 0.0)
    assert not _better(float("nan"), 0.5, "max", 0.0)
    assert not _better(float("inf"), 0.5, "max", 0.0)
    assert not _better(float("-inf"), 0.5, "min", 0.0)
    assert _better(0.6, None, "max", 0.0) and _better(0.6, float("nan"), "max", 0.0)


def test_non_finite_params_are_never_saved(tmp_path):
    with pytest.raises(CinemaError, match="NaN/Inf"):
        ckpt.save_params(tmp_path / "p", {"w": np.array([1.0, np.nan], np.float32)}, None)
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_huge_lr_on_the_segmentation_smoke_config_stops(tmp_path, capsys):
    """The issue's case: `--config.optim.lr=1e6` on a real task used to exit 0 with all-NaN params in best/."""
    from cinema_jax.cli import main as cli

    rc = cli(["train", "--config=configs/finetune_seg.py:smoke", f"--workdir={tmp_path / 'seg'}",
              "--config.optim.lr=1e6", "--config.total_steps=40", "--config.eval_every=10"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: training diverged: non-finite loss"), err
    assert "at step 3;" in err[0]  # Adam's first full-size steps at lr 1e6 blow the logits up by step 3
    best = Path(tmp_path / "seg" / "best")
    if best.exists():
        assert _all_finite(ckpt.load_params(best)[0])
