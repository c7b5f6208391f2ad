"""A small but real Task for loop tests: a two-block Linen MLP regressor with logical-axis annotations.

Why: compiles in about a second on CPU, so the loop's sharding / resume / accumulation / freezing logic can be tested
exactly and quickly; the MAE itself is exercised by the slow end-to-end tests.
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cinema_jax.tasks import register_task
from cinema_jax.tasks.base import Task

DIM = 8


class Block(nn.Module):
    width: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.LayerNorm(name="norm")(x)
        h = nn.Dense(self.width, name="fc1",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(h)
        h = nn.gelu(h)
        if train and self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=False)(h)
        h = nn.Dense(x.shape[-1], name="fc2",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(h)
        return x + h


class Encoder(nn.Module):
    width: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        tok = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                         (1, self.width))
        x = nn.Dense(self.width, name="embed_in",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")))(x)
        x = x + tok
        x = nn.with_logical_constraint(x, ("act_batch", "act_embed"))
        for i in range(2):
            x = Block(4 * self.width, self.dropout, name=f"blocks_{i}")(x, train)
        return x


class ToyModel(nn.Module):
    width: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = Encoder(self.width, self.dropout, name="encoder")(x, train)
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
        return nn.Dense(1, name="head", kernel_init=init)(h)[:, 0]


class ToyTask(Task):
    name = "toy_regress"
    eval_metric = "mse"
    eval_mode = "min"

    def make_model(self, config):
        return ToyModel(int(config.model.width), float(config.model.dropout))

    def source(self, config, split):
        n = dict(config.data.n)[split]
        return grain.MapDataset.source([{"index": i, "split": split} for i in range(n)])

    def transform(self, record, rng, config, train):
        delay = float(os.environ.get("TOY_SAMPLE_DELAY", "0"))
        if delay:  # lets subprocess tests kill a run mid-way
            time.sleep(delay)
        base = np.random.default_rng([7, int(record["index"]), {"train": 0, "val": 1, "test": 2}[record["split"]]])
        x = base.normal(size=DIM).astype(np.float32)
        if train:
            x = x + 0.05 * rng.normal(size=DIM).astype(np.float32)
        y = np.float32(np.sin(x[:4].sum()) + 0.5 * x[4])
        if train and str(record["index"]) in os.environ.get("TOY_NAN_INDEX", "").split(","):
            y = np.float32("nan")  # lets tests make one sample's loss non-finite
        return {"x": x, "y": y}

    def example_batch(self, config, batch_size):
        return {"x": np.zeros((batch_size, DIM), np.float32), "y": np.zeros((batch_size,), np.float32)}

    def model_inputs(self, batch):
        return {"x": batch["x"]}

    def loss(self, model, params, batch, rng, train):
        pred = model.apply({"params": params}, batch["x"], train=train, rngs={"dropout": rng})
        mse = jnp.mean((pred - batch["y"]) ** 2)
        return mse, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    def evaluate(self, model, params, batches, config):
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        errs = [np.asarray(fn(params, b["x"])) - b["y"] for b in batches]
        e = np.concatenate(errs)
        return {"mse": float(np.mean(e ** 2)), "mae": float(np.mean(np.abs(e)))}


TASK = ToyTask()
register_task(TASK)


def toy_config(over: dict | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        task="toy_regress", seed=0, total_steps=12, batch_size=16, log_every=1, checkpoint_every=4, eval_every=0,
        image_every=0, keep_checkpoints=2, mesh=dict(data=-1, fsdp=1, tensor=1), precision="float32", remat="none",
        grad_accum=1, eval_batch_size=0, on_nonfinite="stop",
        optim=dict(lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, clip_norm=5.0,
                   layer_decay=0.0, schedule="cosine"),
        model=dict(width=16, dropout=0.1),
        data=dict(n=dict(train=64, val=16, test=16), worker_count=0, read_threads=1, prefetch=2, worker_buffer=1,
                  device_prefetch=2),
        init_from="", freeze_encoder=False,
        early_stopping=dict(metric="mse", mode="min", patience=0, min_delta=0.0),
    ))
    for k, v in (over or {}).items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c
