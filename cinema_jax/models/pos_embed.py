"""Fixed N-D sin-cos positional embeddings, reference-exact, computed with numpy at trace time.

Why numpy: the embeddings depend only on static grid shapes, so they are compile-time constants (not params; design.md)
and can be computed in float64 and reproduce the reference's table bit-for-bit up to float32 rounding.

Reference facts reproduced here (../shared/docs/cinema.md §1.2):
- the embedding is split equally over the axes (d = dim // n_axes rounded down to even, zero padding at the end);
  each axis chunk is [sin(pos * w), cos(pos * w)] with w_i = 10000 ** (-i / (d / 2));
- the grid is built with `np.meshgrid`'s default `indexing="xy"`, and the resulting rows are used in token order
  (tokens are flattened x-major). For square in-plane grids this means the FIRST chunk encodes the y index and the
  second the x index; for non-square grids the same (scrambled) row order is reproduced, so converted weights match;
- when the input grid differs from the configured one, the table of the configured grid is interpolated like
  `torch.nn.functional.interpolate(mode="bicubic" (2D) / "trilinear" (3D), align_corners=False, antialias=False)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray, max_period: float = 10000.0) -> np.ndarray:
    """(M,) positions -> (M, dim) = [sin(p w), cos(p w)], w_i = max_period ** (-i / (dim / 2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    half = dim // 2
    omega = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=64)
def _sincos_cached(dim: int, grid_size: tuple[int, ...]) -> np.ndarray:
    axes = [np.arange(g, dtype=np.float64) for g in grid_size]
    grid = np.stack(np.meshgrid(*axes), axis=0)  # default indexing="xy" on purpose (reference order)
    n = len(grid_size)
    d = dim // n
    d -= d % 2
    pad = dim - d * n
    parts = [sincos_1d(d, grid[i]) for i in range(n)]
    if pad:
        parts.append(np.zeros((math.prod(grid_size), pad)))
    out = np.concatenate(parts, axis=1).astype(np.float32)
    out.setflags(write=False)
    return out


def sincos_pos_embed(dim: int, grid_size: Sequence[int]) -> np.ndarray:
    """Reference N-D sin-cos table for a grid: (prod(grid_size), dim) float32 in token order."""
    return _sincos_cached(int(dim), tuple(int(g) for g in grid_size))


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch bicubic convolution weights for taps at offsets -1, 0, 1, 2 (t in [0, 1))."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _interp_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) matrix reproducing torch's 1D resampling (align_corners=False, antialias=False)."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = scale * (dst + 0.5) - 0.5
    if mode == "linear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        for o in range(n_out):
            m[o, i0[o]] += 1 - lam[o]
            m[o, i1[o]] += lam[o]
    elif mode == "cubic":
        i0 = np.floor(src).astype(int)
        w = _cubic_weights(src - i0)
        for o in range(n_out):
            for tap in range(4):
                idx = min(max(i0[o] - 1 + tap, 0), n_in - 1)
                m[o, idx] += w[o, tap]
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    return m


def interpolate_table(table: np.ndarray, src_grid: Sequence[int], dst_grid: Sequence[int]) -> np.ndarray:
    """Resample a (prod(src_grid), E) token table to dst_grid (bicubic for 2D, trilinear otherwise)."""
    src_grid = tuple(int(g) for g in src_grid)
    dst_grid = tuple(int(g) for g in dst_grid)
    if src_grid == dst_grid:
        return table
    mode = "cubic" if len(src_grid) == 2 else "linear"
    x = np.asarray(table, dtype=np.float64).reshape(src_grid + (table.shape[-1],))
    for axis, (n_in, n_out) in enumerate(zip(src_grid, dst_grid)):
        if n_in != n_out:
            x = np.moveaxis(np.tensordot(_interp_matrix(n_in, n_out, mode), x, axes=([1], [axis])), 0, axis)
    return x.reshape(math.prod(dst_grid), table.shape[-1]).astype(np.float32)


def pos_embed_for_grid(dim: int, config_grid: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """Table for the configured grid, interpolated to `grid` when the input grid differs (reference behaviour)."""
    return interpolate_table(sincos_pos_embed(dim, config_grid), config_grid, grid)
