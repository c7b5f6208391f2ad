"""Grain pipelines: determinism, resumable iterator state, process slicing and worker-count invariance."""

import numpy as np

from cinema_jax.config import load_config
from cinema_jax.data import pipeline
from cinema_jax.tasks import get_task


def small_config(**over):
    c = load_config("configs/mae_pretrain.py:smoke", [f"{k}={v}" for k, v in over.items()])
    c.data.n_subjects.train = 6
    c.data.n_subjects.val = 3
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_determinism():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=4)
    a = take(pipeline.train_iterator(task, cfg), 3)
    b = take(pipeline.train_iterator(task, cfg), 3)
    assert_batches_equal(a, b)
    assert a[0]["sax"].shape == (4, 32, 32, 4, 1) and a[0]["lax_4c"].shape == (4, 32, 32, 1)
    assert a[0]["sax"].dtype == np.float32 and 0 <= a[0]["sax"].min() and a[0]["sax"].max() <= 1
    other = take(pipeline.train_iterator(task, small_config(batch_size=4, seed=1)), 1)
    assert not np.array_equal(other[0]["sax"], a[0]["sax"])


def test_epochs_draw_new_frames_and_order():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=6)
    e1, e2 = take(pipeline.train_iterator(task, cfg), 2)
    assert not np.array_equal(e1["lax_2c"], e2["lax_2c"])


def test_iterator_state_resumes_exactly():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=2)
    it = pipeline.train_iterator(task, cfg)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 2)
    fresh = pipeline.train_iterator(task, cfg)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), expected)


def test_processes_together_see_the_global_batch():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=4)
    whole = take(pipeline.train_iterator(task, cfg), 2)
    parts = [take(pipeline.train_iterator(task, cfg, p, 2), 2) for p in range(2)]
    for step in range(2):
        for k in whole[step]:
            merged = np.concatenate([parts[0][step][k], parts[1][step][k]])
            np.testing.assert_array_equal(merged, whole[step][k])


def test_worker_count_invariance():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=2)
    ref = take(pipeline.train_iterator(task, cfg, worker_count=0), 3)
    it = pipeline.train_iterator(task, cfg, worker_count=2)
    try:
        got = take(it, 3)
    finally:
        it.close()
    assert_batches_equal(got, ref)


def test_eval_batches_are_fixed_and_keep_the_remainder():
    task, cfg = get_task("pretrain_mae"), small_config(batch_size=2)
    a = list(pipeline.eval_batches(task, cfg, "val"))
    b = list(pipeline.eval_batches(task, cfg, "val"))
    assert [len(x["sax"]) for x in a] == [2, 1]
    assert_batches_equal(a, b)
    assert list(pipeline.eval_batches(task, cfg, "nosuchsplit")) == []
