"""Landmark localisation helpers: Gaussian heatmap targets and the soft-argmax read-out (JAX, channel-last).

Why two model families: the reference offers a heatmap model (ConvUNetR with one output channel per landmark,
Dice + BCE against Gaussian targets with sigma 3 px, coordinates read out by a sharp soft-argmax with beta 1000) and
a coordinate model (ConvViT regressing (x1, y1, x2, y2, x3, y3) / (W, H) with a Wing loss). Both reuse the models in
this package unchanged; this module adds the target rendering and the read-out.

Landmark order on LAX views: mitral-valve hinge 1, hinge 2, apex. Coordinates are pixel indices (x, y) along the
array axes (x first), like the reference's `torch.cartesian_prod(arange(w), arange(h))`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cinema_jax.models.convunetr import ConvUNetR
from cinema_jax.models.encoder import default_image_size

Array = jax.Array


def heatmap_soft_argmax(heatmap: Array, beta: float = 1000.0) -> Array:
    """(B, X, Y, K) heatmap logits/probabilities -> (B, K, 2) float (x, y) pixel coordinates.

    softmax(beta * h) over all pixels of each channel, then the expected (x, y). The reference casts the result to
    integers (truncation) and flattens it to (B, 2K): `coords.reshape(B, -1).astype(int)` reproduces that.
    """
    b, nx, ny, k = heatmap.shape
    logits = jnp.moveaxis(heatmap.astype(jnp.float32), -1, 1).reshape(b, k, nx * ny) * beta
    prob = jax.nn.softmax(logits, axis=-1).reshape(b, k, nx, ny)
    x = jnp.einsum("bkxy,x->bk", prob, jnp.arange(nx, dtype=jnp.float32))
    y = jnp.einsum("bkxy,y->bk", prob, jnp.arange(ny, dtype=jnp.float32))
    return jnp.stack([x, y], axis=-1)


def landmark_heatmaps(coords: Array, shape: Sequence[int], sigma: float = 3.0) -> Array:
    """Gaussian targets in [0, 1]: coords (B, K, 2) pixel (x, y) -> (B, X, Y, K), peak 1 at each landmark."""
    nx, ny = int(shape[0]), int(shape[1])
    gx = jnp.arange(nx, dtype=jnp.float32)[None, :, None, None]
    gy = jnp.arange(ny, dtype=jnp.float32)[None, None, :, None]
    cx = coords[..., 0].astype(jnp.float32)[:, None, None, :]
    cy = coords[..., 1].astype(jnp.float32)[:, None, None, :]
    return jnp.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2.0 * sigma**2))


def heatmap_model(view: str = "lax_4c", image_size: Sequence[int] | None = None, n_landmarks: int = 3,
                  **kwargs) -> ConvUNetR:
    """A ConvUNetR with one output channel per landmark (apply sigmoid for probabilities); `image_size` defaults to
    the view's CineMA size."""
    size = tuple(int(s) for s in (image_size or default_image_size(view)))
    return ConvUNetR(image_sizes=((view, size),), out_chans=n_landmarks, **kwargs)
