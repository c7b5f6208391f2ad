"""DevicePrefetch: batches arrive on device in order, and the checkpointed Grain state is that of the next batch
the step consumes (not of the iterator, which runs ahead by the buffer)."""

import grain
import jax
import numpy as np
import pytest

from cinema_jax.train.prefetch import DevicePrefetch


def _iter():
    ds = grain.MapDataset.range(40).map(lambda i: {"x": np.full((2,), i, np.float32)}).batch(4)
    return iter(ds.to_iter_dataset())


def _put(batch):
    return jax.device_put(batch)


def _firsts(it, n):
    return [int(next(it)["x"][0, 0]) for _ in range(n)]


@pytest.mark.parametrize("size", [1, 3])
def test_order_and_device(size):
    it = DevicePrefetch(_iter(), _put, size)
    first = next(it)
    assert isinstance(first["x"], jax.Array) and first["x"].shape == (4, 2)
    assert [int(first["x"][0, 0])] + _firsts(it, 9) == list(range(0, 40, 4))
    with pytest.raises(StopIteration):
        next(it)


def test_state_is_that_of_next_unconsumed_batch():
    it = DevicePrefetch(_iter(), _put, 3)
    assert _firsts(it, 3) == [0, 4, 8]
    state = it.get_state()
    naive = it._it.get_state()  # the underlying iterator is already 3 batches ahead (the buffer)
    assert _firsts(it, 2) == [12, 16]
    resumed = DevicePrefetch(_iter(), _put, 3)
    resumed.set_state(state)
    resumed.start_prefetch()
    assert _firsts(resumed, 3) == [12, 16, 20]
    # checkpointing the underlying iterator's own state would have skipped the buffered batches 12, 16, 20
    raw = _iter()
    raw.set_state(naive)
    assert int(next(raw)["x"][0, 0]) == 24


def test_grain_checkpoint_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    it = DevicePrefetch(_iter(), _put, 2)
    _firsts(it, 4)
    with ocp.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        fresh = DevicePrefetch(_iter(), _put, 2)
        mgr.restore(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _firsts(fresh, 2) == [16, 20]


def test_bad_size():
    with pytest.raises(ValueError, match="prefetch size"):
        DevicePrefetch(_iter(), _put, 0)
