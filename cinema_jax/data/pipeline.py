"""Grain input pipelines for every task (numpy + grain only; this package never imports jax).

Train: `task.source(config, 'train')` -> shuffle(seed) -> repeat (reshuffled each epoch) -> random_map(task.transform)
-> this process's block of every global batch -> batch(per-process batch, drop_remainder) -> to_iter_dataset ->
mp_prefetch(worker_count). The random transform sits on the MapDataset *before* the per-process selection, so each
sample's randomness is a function of (seed, global index) only: the stream is the same for any worker count and any
number of processes (their local batches, concatenated in block order, are exactly a single process's global
batches), and the iterator state is one integer that Orbax checkpoints (`grain.checkpoint.CheckpointSave`), so a
resumed run continues the exact stream.

Eval: no shuffle, `task.transform(train=False)` with an rng fixed per record (`default_rng([seed, index])`),
batches kept in order and the last partial batch kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from cinema_jax.config import get

EVAL_SEED = 1234


class TaskTransform(grain.transforms.RandomMap):
    """Random map calling `task.transform(record, rng, config, train=True)`. It pickles for Grain's worker processes
    as plain attributes: a registered task pickles itself by name (`tasks.base.Task.__reduce_ex__`), so this layer
    never imports the tasks."""

    def __init__(self, task: Any, config: Any):
        self.task = task
        self.config = config

    def random_map(self, element, rng: np.random.Generator):
        return self.task.transform(element, rng, self.config, True)


class ProcessBlock(grain.MapDataset):
    """Process `block` of `n_blocks`: element k is global element (k // b) * (b * n_blocks) + block * b + k % b.

    Why blocks rather than a strided slice: each global batch is then the concatenation of the processes' local
    batches in process order, i.e. exactly the batch a single process would build, so per-row randomness inside
    the model (masks, dropout) and hence the losses do not depend on the process count.
    """

    def __init__(self, parent: grain.MapDataset, block: int, n_blocks: int, per_block: int):
        super().__init__(parent)
        self._block, self._n, self._b = int(block), int(n_blocks), int(per_block)

    def __len__(self) -> int:
        return (len(self._parent) // (self._b * self._n)) * self._b

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, j = divmod(int(index), self._b)
        return self._parent[step * self._b * self._n + self._block * self._b + j]

    def __str__(self) -> str:
        return f"ProcessBlock(block={self._block}, n_blocks={self._n}, per_block={self._b})"


def _ensure_absl_flags() -> None:
    """Grain's multiprocessing workers read absl flags; parse defaults when no absl app did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _describe(source) -> str:
    """The innermost data source's repr (a MapDataset.source wrapper names only its class)."""
    inner = getattr(source, "_source", None)
    inner = getattr(inner, "base", inner)
    return repr(inner if inner is not None else source)


def per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    return global_batch // process_count


def train_dataset(task: Any, config: Any, process_index: int = 0, process_count: int = 1,
                  worker_count: int | None = None) -> grain.IterDataset:
    """The training IterDataset of this process (iterate it; `get_state`/`set_state` for resume)."""
    seed = int(config.seed)
    source = task.source(config, "train")
    if len(source) == 0:  # a data problem (empty file / split), not a config one: name the source
        from cinema_jax.errors import DataError

        raise DataError(f"the training source is empty: {_describe(source)}")
    if not isinstance(source, grain.MapDataset):
        source = grain.MapDataset.source(source)
    ds = source.shuffle(seed=seed).repeat(None, reseed_each_epoch=True)
    ds = ds.random_map(TaskTransform(task, config), seed=seed)
    local = per_process_batch(int(config.batch_size), process_count)
    if process_count > 1:
        ds = ProcessBlock(ds, process_index, process_count, local)
    ds = ds.batch(local, drop_remainder=True)
    if worker_count is None:
        worker_count = int(get(config, "data.worker_count"))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(get(config, "data.read_threads")),
                                              prefetch_buffer_size=int(get(config, "data.prefetch"))))
    if worker_count > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=int(get(config, "data.worker_buffer"))),
                            worker_init_fn=_worker_ignores_sigterm)
    return it


def _worker_ignores_sigterm(worker_index: int, worker_count: int) -> None:
    """A scheduler's SIGTERM goes to the whole process group: data workers leave it to the main process, which
    finishes its step, saves and then closes them (train/preemption.py); killed mid-batch they would leak shared
    memory and fail the step in flight."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_iterator(task: Any, config: Any, process_index: int = 0, process_count: int = 1,
                   worker_count: int | None = None):
    return iter(train_dataset(task, config, process_index, process_count, worker_count))


def _eval_map(task, config, seed: int):
    def fn(index: int, record):
        return task.transform(record, np.random.default_rng([seed, index]), config, False)

    return fn


def eval_dataset(task: Any, config: Any, split: str = "val", batch_size: int | None = None,
                 seed: int = EVAL_SEED) -> grain.MapDataset | None:
    """Deterministic eval batches of `split` as a MapDataset (None when the task has no such split)."""
    try:
        source = task.source(config, split)
    except (KeyError, ValueError):
        return None
    if source is None:
        return None
    if not isinstance(source, grain.MapDataset):
        source = grain.MapDataset.source(source)
    if len(source) == 0:
        return None
    if batch_size is None:
        batch_size = int(get(config, "eval_batch_size")) or int(config.batch_size)
    return source.map_with_index(_eval_map(task, config, seed)).batch(batch_size, drop_remainder=False)


def eval_batches(task: Any, config: Any, split: str = "val", batch_size: int | None = None,
                 seed: int = EVAL_SEED) -> Iterator[dict]:
    ds = eval_dataset(task, config, split, batch_size, seed)
    if ds is None:
        return iter(())
    return (ds[i] for i in range(len(ds)))
