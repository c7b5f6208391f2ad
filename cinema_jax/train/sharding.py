"""Device mesh (data, fsdp, tensor), logical-axis rules and the shardings of params, optimizer state and batches.

Why logical rules: the models only name their axes (`embed`, `mlp`, `heads`, `kv`, ...) through
`nn.with_logical_partitioning`; which mesh axis each name maps to is decided here, so the same model code runs
data-parallel, FSDP (params' `embed` dim split over `fsdp`) or Megatron-style tensor parallel (`mlp`/`heads`/`kv`
split over `tensor`) by changing `config.mesh` only. A dimension that the mesh axis does not divide is replicated
instead of failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cinema_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("conv_in", None),
    ("conv_out", None),
    ("classes", None),
    ("vocab", None),
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
)


def mesh_shape(mesh_cfg, n_devices: int, allow_subset: bool = False) -> tuple[int, int, int]:
    """Resolve `{data, fsdp, tensor}` (one entry may be -1 = all remaining devices) against the device count.

    With `allow_subset` (single process only) a smaller mesh uses the first devices, e.g. (1, 1, 1) on 8.
    """
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) < n_devices and n_devices % math.prod(sizes) == 0 and allow_subset:
        return tuple(sizes)
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{n_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Auto-mode mesh over all (global) devices: Flax's logical-axis workflow assumes Auto axis types."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices), allow_subset=jax.process_count() == 1)
    devices = devices[: math.prod(shape)]
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def mesh_spec(logical: Any, shape: tuple[int, ...], mesh, rules=LOGICAL_RULES) -> P:
    """Logical names -> PartitionSpec, replicating dims that the mapped mesh axes do not divide."""
    if logical is None:
        return P()
    axes = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    used: set[str] = set()
    for dim, ax in zip(shape, tuple(axes) + (None,) * (len(shape) - len(axes))):
        names = (ax,) if isinstance(ax, str) else tuple(ax or ())
        if not names or dim % _axis_size(mesh, names) or used & set(names):
            out.append(None)
            continue
        used.update(names)
        out.append(ax)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def param_shardings(abstract_boxed: Any, mesh, rules=LOGICAL_RULES) -> Any:
    """NamedSharding tree (unboxed structure) from `jax.eval_shape(model.init ...)['params']` (boxed leaves)."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, mesh_spec(leaf.names, tuple(value.shape), mesh, rules))
        if _is_box(leaf):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_boxed, is_leaf=_is_box)


def strip_boxes(tree: Any) -> Any:
    """Unbox Linen metadata boxes without applying their sharding constraints (our shardings come from the rules
    plus divisibility checks, applied through jit out_shardings)."""
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dim split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def opt_state_shardings(tx, abstract_params: Any, params_sharding: Any, mesh) -> Any:
    """Optimizer-state shardings: param-shaped subtrees (Adam mu/nu) follow the params, the rest is replicated."""
    import optax

    state = jax.eval_shape(tx.init, abstract_params)
    rep = replicated(mesh)
    return optax.tree_map_params(tx, lambda _, s: s, state, params_sharding,
                                 transform_non_params=lambda _: rep)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over (data, fsdp) (multi-host safe)."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def process_batch_block(global_batch: int, sharding: NamedSharding) -> tuple[int, int]:
    """(block index, number of blocks) of this process's rows in the global batch.

    The local batch fills the rows of this process's devices; the pipeline must produce exactly those samples, so
    the block is read from the sharding rather than assumed to be `process_index`.
    """
    n = jax.process_count()
    if n == 1:
        return 0, 1
    local = global_batch // n
    rows = sorted({(idx[0].start or 0) for idx in sharding.addressable_devices_indices_map((global_batch,)).values()})
    start = rows[0]
    per_dev = global_batch // math.prod(sharding.mesh.shape[a] for a in BATCH_AXES)
    if start % local or any(r not in range(start, start + local) for r in rows) or len(rows) * per_dev != local:
        raise ConfigError("this mesh gives a process non-contiguous batch rows; order the mesh so that each "
                          "process holds one contiguous block of the data x fsdp axes")
    return start // local, n


def check_batch_divisible(global_batch: int, mesh, grad_accum: int = 1) -> None:
    n = _axis_size(mesh, BATCH_AXES)
    if global_batch % grad_accum or (global_batch // grad_accum) % n:
        raise ConfigError(f"batch_size {global_batch} / grad_accum {grad_accum} must be divisible by the "
                          f"data x fsdp mesh size {n}")
    if global_batch % jax.process_count():
        raise ConfigError(f"batch_size {global_batch} must be divisible by the process count {jax.process_count()}")
