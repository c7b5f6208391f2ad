"""Checkpoint integrity: a per-tensor checksum saved with every params / state tree and verified on restore.

Why our own: Orbax and TensorStore store raw chunks without a content hash, so a flipped byte in a params file
restores silently (and changes a mask) and a few corrupt bytes restore as NaN weights that `infer` then blames on the
image. Each tensor gets a 64-bit fingerprint of its bytes, the same whether it is computed on the host (numpy, for
params exports) or on the mesh (jitted over sharded arrays, for training state: no gather to one host):

    words w_i = the tensor's bytes as uint32 (2- and 1-byte dtypes widened), i = flat index, all arithmetic mod 2**32
    h1 = sum_i w_i * (2 i + 1)          (odd weights: any change of one word changes h1)
    h2 = sum_i rotl(w_i, 1 + i mod 31) ^ (i * 0x9E3779B1)

Modular sums are exact and order-free, so the result does not depend on the mesh, the reduction order or the
device. It detects corruption, not tampering (use signed files for that).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CHECKSUMS = "checksums.json"  # beside params/ in a params export
_GOLDEN = 0x9E3779B1


def _flat(tree: Any) -> dict[str, Any]:
    """{'a/b/0': leaf}: the same names for a host tree and the device tree it was restored into."""
    import jax

    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------------ host (numpy)
def _words_np(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(-1)
    size = x.dtype.itemsize
    if size == 4:
        return x.view(np.uint32)
    if size == 2:
        return x.view(np.uint16).astype(np.uint32)
    if size == 1:
        return x.view(np.uint8).astype(np.uint32)
    if size == 8:
        return x.view(np.uint32)
    raise TypeError(f"cannot checksum dtype {x.dtype}")


def _fingerprint_np(x: np.ndarray) -> str:
    w = _words_np(np.asarray(x))
    i = np.arange(w.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h1 = np.sum(w * (np.uint32(2) * i + np.uint32(1)), dtype=np.uint32)
        r = np.uint32(1) + i % np.uint32(31)
        rot = (w << r) | (w >> (np.uint32(32) - r))
        h2 = np.sum(rot ^ (i * np.uint32(_GOLDEN)), dtype=np.uint32)
    return f"{int(h1):08x}{int(h2):08x}"


def host_checksums(tree: Any) -> dict[str, str]:
    """{path: fingerprint} of a tree of host arrays (numpy or anything np.asarray accepts)."""
    return {k: _fingerprint_np(np.asarray(v)) for k, v in _flat(tree).items()}


# ------------------------------------------------------------------------------------------------ device (jitted)
def _words_jnp(x):
    import jax
    import jax.numpy as jnp

    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"cannot checksum dtype {x.dtype} on device")


def _fingerprint_jnp(x):
    import jax.numpy as jnp

    w = _words_jnp(x)
    i = jnp.arange(w.size, dtype=jnp.uint32)
    h1 = jnp.sum(w * (jnp.uint32(2) * i + jnp.uint32(1)), dtype=jnp.uint32)
    r = jnp.uint32(1) + i % jnp.uint32(31)
    rot = (w << r) | (w >> (jnp.uint32(32) - r))
    h2 = jnp.sum(rot ^ (i * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
    return jnp.stack([h1, h2])


def _device_summary(tree):
    """(per-leaf [h1, h2] pairs, all params/floats finite) in one jitted pass over a (sharded) tree."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_leaves(tree)
    sums = [_fingerprint_jnp(x) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32), \
        jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


_SUMMARY = None


def device_checksums(tree: Any) -> tuple[dict[str, str], bool]:
    """({path: fingerprint}, every float leaf finite) of a tree of (possibly sharded, multi-host) jax arrays,
    computed where the arrays live; equal to `host_checksums` of the same values. All processes must call it."""
    import jax

    global _SUMMARY
    if _SUMMARY is None:
        _SUMMARY = jax.jit(_device_summary)
    pairs, finite = _SUMMARY(tree)
    pairs = np.asarray(jax.device_get(pairs))  # replicated: every process reads the same values
    names = list(_flat(tree))
    return {k: f"{int(a):08x}{int(b):08x}" for k, (a, b) in zip(names, pairs)}, bool(jax.device_get(finite))


def mismatches(saved: dict[str, str], found: dict[str, str], prefix: str = "") -> list[str]:
    """Paths (under `prefix`) whose fingerprint differs from the saved one or is missing on either side."""
    want = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    return sorted(k for k in set(want) | set(found) if want.get(k) != found.get(k))
