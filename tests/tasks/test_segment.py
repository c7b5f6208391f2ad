"""Segmentation task: samples match the example batch, Dice+CE loss is finite with gradients, evaluation writes the
per-subject CSV + summary JSON, and (slow) the smoke config trains through the loop from an MAE smoke checkpoint."""

import json

import jax
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.tasks.segment import TASK, dice_ce_loss


def _batch(task, config, split, n, train):
    src = task.source(config, split)
    items = [task.transform(src[i], np.random.default_rng(i), config, train) for i in range(n)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def _init(task, config):
    import flax.linen as nn

    model = task.make_model(config)
    ex = task.example_batch(config, 1)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, **task.model_inputs(ex), train=False)["params"])
    return model, params


def test_dice_ce_known_values():
    import jax.numpy as jnp

    labels = jnp.array([[0, 1, 2, 3]])
    perfect = jax.nn.one_hot(labels, 4) * 50.0
    loss, parts = dice_ce_loss(perfect, labels, jnp.ones((1, 4)), 4)
    assert float(parts["dice_loss"]) < 1e-4 and float(parts["ce_loss"]) < 1e-4
    flat = jnp.zeros((1, 4, 4))
    _, parts = dice_ce_loss(flat, labels, jnp.ones((1, 4)), 4)
    assert float(parts["ce_loss"]) == pytest.approx(np.log(4), rel=1e-5)


def test_transform_loss_evaluate(tmp_path):
    config = load_config("configs/finetune_seg.py:smoke")
    batch = _batch(TASK, config, "train", 2, True)
    ex = TASK.example_batch(config, 2)
    assert set(batch) == set(ex)
    for k in ex:
        assert batch[k].shape == ex[k].shape and batch[k].dtype == ex[k].dtype, k
    assert set(np.unique(batch["label"])) <= {0, 1, 2, 3} and (batch["label"] == 3).any()
    model, params = _init(TASK, config)
    loss, metrics = jax.jit(lambda p, b: TASK.loss(model, p, b, jax.random.key(1), True))(params, batch)
    assert np.isfinite(float(loss)) and {"dice_loss", "ce_loss"} <= set(metrics)
    val = [_batch(TASK, config, "val", 4, False)]
    summary = TASK.evaluate(model, params, val, config, out_dir=tmp_path)
    assert TASK.eval_metric in summary and 0.0 <= summary["mean_dice"] <= 1.0
    assert "lv_ef_mae" in summary  # both phases of each val subject present
    assert (tmp_path / "metrics.csv").read_text().startswith("pid,uid,phase,dice_RV")
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["n_samples"] == 4
    TASK.visualize(model, params, val[0], jax.random.key(0), tmp_path / "vis.png")
    assert (tmp_path / "vis.png").stat().st_size > 0


@pytest.mark.slow
def test_smoke_trains_from_mae(tmp_path_factory, mae_smoke):
    from cinema_jax.train.loop import train

    mae = mae_smoke
    work = tmp_path_factory.mktemp("seg")
    config = load_config("configs/finetune_seg.py:smoke", [f"init_from={mae}"])
    out = train(config, work)
    assert out["step"] == config.total_steps
    assert list((work / "images").glob("*.png")), "visualize wrote no overlay PNG"
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mean_dice" in r for r in lines)
