"""Mesh construction, logical-axis rules and the shardings of params / optimizer state / batches."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_toy_task import toy_config

from cinema_jax.errors import ConfigError
from cinema_jax.train import sharding as shd
from cinema_jax.train.loop import Setup


def test_mesh_shape_fills_minus_one():
    assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        shd.mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="at most one"):
        shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_mesh_spec_replicates_indivisible_dims():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert shd.mesh_spec(("embed", "mlp"), (16, 64), mesh) == P("fsdp", "tensor")
    assert shd.mesh_spec(("embed", "mlp"), (6, 64), mesh) == P(None, "tensor")


def test_param_and_opt_state_shardings_follow_rules():
    setup = Setup(toy_config({"mesh": {"data": 2, "fsdp": 2, "tensor": 2}}))
    with setup.context():
        state = setup.init_state()
    fc1 = state["params"]["encoder"]["blocks_0"]["fc1"]
    assert fc1["kernel"].sharding.spec == P("fsdp", "tensor")
    assert fc1["bias"].sharding.spec == P("tensor")
    assert state["params"]["encoder"]["blocks_0"]["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state["params"]["encoder"]["blocks_0"]["norm"]["scale"].sharding.spec == P()
    mu = state["opt_state"][1].mu  # chain: clip, adam, ...
    assert mu["encoder"]["blocks_0"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_shard_batch_splits_over_data_and_fsdp():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = shd.shard_batch({"x": np.zeros((8, 3), np.float32)}, shd.batch_sharding(mesh))
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)
