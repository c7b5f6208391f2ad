"""Channel-last patchify / unpatchify and MAE mask helpers with the reference's token order.

Tokens are flattened x-major (then y, then z) and the pixels inside a patch are ordered (x, y, z, c), exactly the
reference's `nchpwqdr->nhwdpqrc`, so converted prediction heads and injected masks line up with the PyTorch model.
Masks are bool (B, N) with True = masked (removed from the encoder, predicted by the decoder), as in the reference.
All shapes are static: a mask holds the same number of visible tokens in every row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def grid_size(image_size: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    for s, p in zip(image_size, patch):
        if s % p:
            raise ValueError(f"image size {tuple(image_size)} is not divisible by patch size {tuple(patch)}")
    return tuple(int(s) // int(p) for s, p in zip(image_size, patch))


def patchify(image: Array, patch: Sequence[int]) -> Array:
    """(B, *spatial, C) -> (B, n_patches, prod(patch) * C)."""
    b, *spatial, c = image.shape
    nd = len(patch)
    if len(spatial) != nd:
        raise ValueError(f"image has {len(spatial)} spatial dims but patch size {tuple(patch)}")
    g = grid_size(spatial, patch)
    shape = [b]
    for gi, pi in zip(g, patch):
        shape += [gi, int(pi)]
    x = image.reshape(shape + [c])
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    x = x.transpose(perm)
    return x.reshape(b, math.prod(g), math.prod(patch) * c)


def unpatchify(tokens: Array, patch: Sequence[int], grid: Sequence[int]) -> Array:
    """(B, n_patches, prod(patch) * C) -> (B, *spatial, C)."""
    b, n, pc = tokens.shape
    nd = len(patch)
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill grid {tuple(grid)}")
    c = pc // math.prod(patch)
    x = tokens.reshape((b,) + tuple(grid) + tuple(patch) + (c,))
    perm = [0]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    perm += [1 + 2 * nd]
    x = x.transpose(perm)
    return x.reshape((b,) + tuple(int(g) * int(p) for g, p in zip(grid, patch)) + (c,))


def upsample_mask(mask: Array, factor: Sequence[int]) -> Array:
    """Nearest (repeat) upsampling of a (B, *grid) map by an integer factor per axis."""
    for axis, f in enumerate(factor):
        if int(f) != 1:
            mask = jnp.repeat(mask, int(f), axis=axis + 1)
    return mask


def n_keep_for(n_patches: int, ratio: float) -> int:
    """Visible tokens per sample for a mask ratio, as the reference: int(N * (1 - ratio))."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(n_patches * (1 - ratio))


def random_mask(key: Array, batch: int, n_patches: int, ratio: float) -> Array:
    """Per-sample uniform random mask (B, N) bool, True = masked, exactly n_keep visible tokens per row."""
    n_keep = n_keep_for(n_patches, ratio)
    noise = jax.random.uniform(key, (batch, n_patches))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return rank >= n_keep


def mask_indices(mask: Array, n_keep: int) -> tuple[Array, Array]:
    """(visible idx (B, n_keep), masked idx (B, N - n_keep)), both in increasing patch order."""
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    return order[:, :n_keep], order[:, n_keep:]


def gather_tokens(x: Array, idx: Array) -> Array:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def reconstruct(images: Array, pred: Array, mask: Array, patch: Sequence[int]) -> Array:
    """Full image with masked patches replaced by the MAE prediction (for pictures): (B, *spatial, C)."""
    target = patchify(images, patch)
    n_keep = target.shape[1] - pred.shape[1]
    _, masked_idx = mask_indices(mask, n_keep)
    b = jnp.arange(target.shape[0])[:, None]
    full = target.at[b, masked_idx].set(pred.astype(target.dtype))
    return unpatchify(full, patch, grid_size(images.shape[1:-1], patch))
