"""RegressTask: samples match the example batch, the loss is finite, evaluation writes CSV + JSON with `mae`,
and (slow) the smoke config trains through the loop from an MAE smoke checkpoint."""

import json

import jax
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.tasks.regress import TASK

VARIANTS = ["smoke"]


def _batch(config, split, n, train):
    src = TASK.source(config, split)
    items = [TASK.transform(src[i], np.random.default_rng(i), config, train) for i in range(n)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_transform_loss_evaluate(tmp_path, variant):
    import flax.linen as nn

    config = load_config(f"configs/finetune_reg.py:{variant}")
    batch = _batch(config, "train", 2, True)
    ex = TASK.example_batch(config, 2)
    assert set(batch) == set(ex)
    for k in ex:
        assert batch[k].shape == ex[k].shape and batch[k].dtype == ex[k].dtype, k
    model = TASK.make_model(config)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, **TASK.model_inputs(ex), train=False)["params"])
    loss, _ = jax.jit(lambda p, b: TASK.loss(model, p, b, jax.random.key(1), True))(params, batch)
    assert np.isfinite(float(loss))
    summary = TASK.evaluate(model, params, [_batch(config, "val", 4, False)], config, out_dir=tmp_path)
    assert np.isfinite(summary["mae"])
    assert (tmp_path / "metrics.csv").is_file()
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["n_samples"] == 4


@pytest.mark.slow
def test_smoke_trains_from_mae(tmp_path_factory):
    from cinema_jax.train.loop import train

    mae = tmp_path_factory.getbasetemp() / "mae_smoke"
    if not (mae / "best").is_dir() and not (mae / "checkpoints").is_dir():
        train(load_config("configs/mae_pretrain.py:smoke", ["total_steps=16", "eval_every=16"]), mae)
    work = tmp_path_factory.mktemp("regress")
    config = load_config("configs/finetune_reg.py:smoke", [f"init_from={mae}"])
    out = train(config, work)
    assert out["step"] == config.total_steps
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mae" in r for r in lines)
