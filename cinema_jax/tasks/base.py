"""The Task protocol: everything task-specific the one training loop (`cinema_jax.train.loop`) needs.

Why a protocol: pretraining, segmentation, classification, regression, landmarks and denoising differ only in data,
model, loss and metrics; mesh, sharding, optimizer, checkpoints, logging and resume are shared. A task module
exposes `TASK = MyTask()`; `cinema_jax.tasks.get_task(config.task)` finds it.

Required: `name`, `eval_metric`, `eval_mode`, `make_model`, `source`, `transform`, `example_batch`, `model_inputs`,
`loss`, `evaluate`. Optional: `visualize` (PNG every `image_every` steps), `configure(config)` (called once before
training), `images_per_sample(config)` (for the images/s figure).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class Task:
    """Base class with the protocol's optional hooks; subclasses implement the rest (see module docstring)."""

    name: str = ""
    eval_metric: str = "loss"
    eval_mode: str = "min"  # 'max' | 'min'

    def __reduce_ex__(self, protocol):
        """A registered task pickles as its name (Grain workers re-import the module singleton, with its caches);
        an unregistered one as its class and state."""
        from cinema_jax.errors import ConfigError
        from cinema_jax.tasks import get_task

        try:
            if self.name and get_task(self.name) is self:
                return get_task, (self.name,)
        except ConfigError:
            pass
        return super().__reduce_ex__(protocol)

    def configure(self, config) -> Task:
        """Hook to read task options from the config before training (default: nothing)."""
        del config
        return self

    def make_model(self, config):
        """A Linen module built from `config.model` with `dtype` from `config.precision`, `remat` from
        `config.remat`."""
        raise TypeError(f"task {self.name!r} must implement make_model")

    def source(self, config, split: str):
        """A `grain.MapDataset` (or random-access sequence) of light records for 'train' / 'val' / 'test'."""
        raise TypeError(f"task {self.name!r} must implement source")

    def transform(self, record, rng: np.random.Generator, config, train: bool) -> dict[str, np.ndarray]:
        """One sample (no batch dim), numpy only, all randomness from `rng`."""
        raise TypeError(f"task {self.name!r} must implement transform")

    def example_batch(self, config, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros with the shapes/dtypes of a batch (used for `model.init`)."""
        raise TypeError(f"task {self.name!r} must implement example_batch")

    def model_inputs(self, batch) -> dict:
        """kwargs for `model.init` / `model.apply` built from a batch."""
        raise TypeError(f"task {self.name!r} must implement model_inputs")

    def loss(self, model, params, batch, rng, train: bool) -> tuple[Any, dict[str, Any]]:
        """(scalar loss, {name: scalar}) — pure and jittable; `rng` is a jax PRNG key."""
        raise TypeError(f"task {self.name!r} must implement loss")

    def evaluate(self, model, params, batches: Iterable[dict], config) -> dict[str, float]:
        """Metrics over deterministic eval batches (host loop; may jit internally). Must contain `eval_metric`."""
        raise TypeError(f"task {self.name!r} must implement evaluate")

    def visualize(self, model, params, batch, rng, path) -> None:
        """Write a PNG for a (host numpy) batch; the default writes nothing."""
        del model, params, batch, rng, path

    def images_per_sample(self, config) -> int:
        """How many images one sample holds (views x frames), for the images/s figure."""
        del config
        return 1
