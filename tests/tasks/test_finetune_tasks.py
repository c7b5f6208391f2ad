"""Classify, regress and landmark tasks: samples match the example batch, a few Adam steps on one batch lower the
loss (gradients reach the head through the task's loss), evaluation writes CSV + JSON with the task's metric, and
(slow) each smoke config trains through the loop from an MAE smoke checkpoint. Plus known values of the landmark
losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cinema_jax.config import load_config
from cinema_jax.tasks import get_task

CASES = [  # task, config, variant, eval metric
    ("classify", "finetune_cls.py", "smoke", "mcc"),
    ("regress", "finetune_reg.py", "smoke", "mae"),
    ("landmark", "finetune_landmark.py", "smoke", "mean_distance"),
    ("landmark", "finetune_landmark.py", "smoke_coordinate", "mean_distance"),
]
IDS = [f"{t}:{v}" for t, _, v, _ in CASES]


def _batch(task, config, split, n, train):
    src = task.source(config, split)
    items = [task.transform(src[i], np.random.default_rng(i), config, train) for i in range(n)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("name, cfg, variant, metric", CASES, ids=IDS)
def test_transform_loss_evaluate(tmp_path, name, cfg, variant, metric):
    import flax.linen as nn
    import optax

    task = get_task(name)
    config = load_config(f"configs/{cfg}:{variant}")
    batch = _batch(task, config, "train", 2, True)
    ex = task.example_batch(config, 2)
    assert set(batch) == set(ex)
    for k in ex:
        assert batch[k].shape == ex[k].shape and batch[k].dtype == ex[k].dtype, k
    model = task.make_model(config)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, **task.model_inputs(ex), train=False)["params"])

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(lambda q: task.loss(model, q, batch, jax.random.key(1), True),
                                          has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, s, losses = params, opt.init(params), []
    for _ in range(6):
        p, s, loss = step(p, s)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses

    summary = task.evaluate(model, params, [_batch(task, config, "val", 4, False)], config, out_dir=tmp_path)
    assert np.isfinite(summary[metric])
    assert (tmp_path / "metrics.csv").read_text().startswith("pid,")
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["n_samples"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("name, cfg, variant, metric", CASES[:3], ids=IDS[:3])
def test_smoke_trains_from_mae(tmp_path_factory, mae_smoke, name, cfg, variant, metric):
    from cinema_jax.train.loop import train

    work = tmp_path_factory.mktemp(name)
    config = load_config(f"configs/{cfg}:{variant}", [f"init_from={mae_smoke}"])
    out = train(config, work)
    assert out["step"] == config.total_steps
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert any(f"eval/{metric}" in r for r in lines)


def test_wing_loss_known_values():
    from cinema_jax.tasks.landmark import wing

    w, eps = 10.0, 2.0
    x = jnp.array([0.0, 2.0, -2.0, 10.0, 20.0])
    c = w - w * np.log1p(w / eps)
    want = [0.0, w * np.log(2.0), w * np.log(2.0), w * np.log1p(5.0), 20.0 - c]
    np.testing.assert_allclose(np.asarray(wing(x, w, eps)), want, rtol=1e-6)
    # continuous at |x| = w: the log branch and the linear branch meet
    assert abs(float(wing(jnp.array(10.0 + 1e-4))) - float(wing(jnp.array(10.0 - 1e-4)))) < 1e-3


def test_rel_is_offset_from_mean_of_other_two():
    from cinema_jax.tasks.landmark import _rel

    p = jnp.array([[[0.0, 0.0], [4.0, 0.0], [0.0, 6.0]]])
    np.testing.assert_allclose(np.asarray(_rel(p))[0], [[-2.0, -3.0], [4.0, -3.0], [-2.0, 6.0]])
