"""The conv lowerings `layers.Conv` and `layers.conv2d` pick under `conv_impl` 'tuned' ('auto' on CPU), with their
hand-written gradients.

Why a module of their own: XLA:CPU's grouped, 3-D and whole-image-window (kernel gradient) convolutions run far
below its matmul speed, so on CPU the stem's depth-wise convs, ConvUNetR's 3x3x3 convs and the denoiser's 2-D kernel
gradients are written as shifted sums, 2-D convs over depth planes and row-slice matmuls instead (notes/perf.md has
the measurements). They compute the same values and gradients as `jax.lax.conv_general_dilated`
(tests/models/test_layers_conv.py, test_conv_impl.py); GPU and TPU keep XLA's convolution unless told otherwise.
`layers` chooses between them (`resolve_conv_impl`); nothing here reads a setting.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CONV_DIMS = {1: ("NHC", "HIO", "NHC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NHWDC", "HWDIO", "NHWDC")}


def _depth_planes_conv(x: Array, w: Array, strides: tuple[int, ...], padding, groups: int) -> Array:
    """3-D conv (depth stride 1) as 2-D convs over (B*Z) of depth-shifted input planes.

    groups == 1: one 2-D conv whose input channels stack the kz shifted planes (kz*C, depth-tap major), kernel
    (kx, ky, kz*C, O); its kernel gradient is then one wide XLA conv instead of kz narrow ones (ConvUNetR 3x3x3,
    forward + backward under the checkpoint of `lax_conv`: 1.45 vs 1.62 s at 2x192x192x16x32, 1.14 vs 1.42 s at
    96^2 x 64; the seg step 32.0 vs 34.0 s; notes/perf.md). Grouped convs sum one 2-D conv per depth tap."""
    kz = w.shape[2]
    if isinstance(padding, str):
        lo, hi = ((kz - 1) // 2, kz // 2) if padding == "SAME" else (0, 0)  # lax's SAME split at stride 1
        pad2 = padding
    else:
        (lo, hi), pad2 = padding[2], tuple(padding[:2])
    if lo or hi:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, hi), (0, 0)))
    b, nx, ny, nzp, c = x.shape
    nz = nzp - kz + 1
    planes = x.transpose(0, 3, 1, 2, 4)  # (B, Z, X, Y, C)
    if groups == 1 and kz > 1:
        stack = jnp.concatenate([planes[:, dz:dz + nz] for dz in range(kz)], -1).reshape(b * nz, nx, ny, kz * c)
        y = lax_conv(stack, w.reshape(w.shape[:2] + (kz * c, w.shape[-1])), strides[:2], pad2, 1)
        return y.reshape((b, nz) + y.shape[1:]).transpose(0, 2, 3, 1, 4)
    y = None
    for dz in range(kz):
        plane = planes[:, dz:dz + nz].reshape(b * nz, nx, ny, c)
        t = lax_conv(plane, w[:, :, dz], strides[:2], pad2, groups)
        y = t if y is None else y + t
    return y.reshape((b, nz) + y.shape[1:]).transpose(0, 2, 3, 1, 4)


def _flat_taps_kernel_grad(xp: Array, g: Array, k: tuple[int, int]) -> Array:
    """dw[i, j] = sum over (b, p, q) of xp[b, p + i, q + j, :]^T g[b, p, q, :] for a VALID stride-1 2-D conv.

    With g zero-padded to xp's (H, W), each image flattens to (H*W, C) rows, and tap (i, j) is the row offset
    i*W + j: g's padding zeroes every product that would wrap into the next row. So each tap is a batched matmul of
    contiguous row slices, (C x HW) @ (HW x O) per image, summed over images (`conv2d_valid`). The slices are
    copies, so the taps run one after another (a barrier between them): otherwise XLA keeps all nine alive at once
    (+10 GB in the denoiser step)."""
    n, hp, wp, c = xp.shape
    kh, kw = k
    o = g.shape[-1]
    offs = [i * wp + j for i in range(kh) for j in range(kw)]
    gf = jnp.pad(g, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0))).reshape(n, hp * wp, o)
    xf = jnp.pad(xp.reshape(n, hp * wp, c), ((0, 0), (0, offs[-1]), (0, 0)))  # every slice full length
    acc = None
    for off in offs:
        if acc is not None:
            acc, xf, gf = jax.lax.optimization_barrier((acc, xf, gf))
        tap = jnp.einsum("bpc,bpo->co", xf[:, off:off + hp * wp], gf, preferred_element_type=jnp.float32)
        acc = tap[None] if acc is None else jnp.concatenate([acc, tap[None]])
    return acc.reshape(kh, kw, c, o)


def xla_conv2d(x: Array, w: Array, padding="VALID") -> Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=CONV_DIMS[2])


@jax.custom_vjp
def conv2d_valid(x: Array, w: Array) -> Array:
    """VALID stride-1 2-D conv: XLA's forward and input gradient, the kernel gradient by `_flat_taps_kernel_grad`.

    XLA:CPU computes the kernel gradient as a convolution whose window is the whole image (64x64 for the denoiser),
    at ~70 GFLOP/s where a matmul runs at ~190: 62 % of the traced op time of the denoiser's step (notes/perf.md).
    Isolated, the row-slice matmuls were 2.5-3x faster for C <= O; in the whole step, 11-15 %."""
    return xla_conv2d(x, w)


def _conv2d_valid_fwd(x, w):
    return xla_conv2d(x, w), (x, w)


def _conv2d_valid_bwd(res, g):
    x, w = res
    dw = _flat_taps_kernel_grad(x, g, w.shape[:2]).astype(w.dtype)
    dw, g = jax.lax.optimization_barrier((dw, g))  # kernel gradient first: x is freed before dx is made
    dx = jax.vjp(lambda a: xla_conv2d(a, w), x)[1](g)[0]
    return dx, dw


conv2d_valid.defvjp(_conv2d_valid_fwd, _conv2d_valid_bwd)


def lax_conv(x: Array, w: Array, strides: tuple[int, ...], padding, groups: int, tuned: bool = True) -> Array:
    """lax conv, channel-last. `tuned`: a 3-D kernel with depth stride 1 runs as 2-D convs over (B*Z) planes
    (`_depth_planes_conv`): XLA:CPU's 3-D conv path is ~3-5x slower forward and backward (ConvUNetR 3x3x3,
    notes/perf.md)."""
    nd = x.ndim - 2
    if tuned and nd == 3 and strides[2] == 1:
        planes_conv = functools.partial(_depth_planes_conv, strides=strides, padding=padding, groups=groups)
        if w.shape[2] == 1:
            return planes_conv(x, w)
        # the stacked / per-tap input planes are copies: rematerialise them in backward so only x is kept (as XLA's
        # 3-D conv); without it the seg step was no faster (34.0 s) and as large
        return jax.checkpoint(planes_conv)(x, w)
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=CONV_DIMS[nd],
                                        feature_group_count=groups)


def _taps(xp: Array, w: Array, spatial: tuple[int, ...]) -> Array:
    """sum over kernel offsets of the shifted (padded) input times per-channel weights: XLA fuses it into one loop.

    A 3-D kernel is summed one depth offset at a time, with a barrier between the partial sums: inside a larger
    graph XLA:CPU otherwise splits the 125-tap sum into dozens of materialised slices and broadcasts (~0.5 GB of
    temporaries per conv at SAX-stem size, and slower)."""
    k = w.shape[:-2]
    if len(k) == 3 and k[2] > 1:
        y = None
        for dz in range(k[2]):
            part = _taps(xp[:, :, :, dz:dz + spatial[2]], w[:, :, dz:dz + 1], spatial)
            y = part if y is None else jax.lax.optimization_barrier(y) + part
        return y
    y = None
    for off in itertools.product(*(range(kk) for kk in k)):
        tap = xp[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(off, spatial))] * w[off + (0,)]
        y = tap if y is None else y + tap
    return y


def _same_pad(x: Array, k: tuple[int, ...], flipped: bool = False) -> Array:
    """'SAME' padding for kernel k; `flipped` mirrors it (the padding of the transposed correlation)."""
    return jnp.pad(x, [(0, 0)] + [(kk // 2, (kk - 1) // 2) if flipped else ((kk - 1) // 2, kk // 2) for kk in k]
                   + [(0, 0)])


def _fft_kernel_grad(xp: Array, g: Array, k: tuple[int, ...]) -> Array:
    """dw[d..., c] = sum over (b, p...) of xp[b, p + d, c] * g[b, p, c] as a cross-correlation through rfftn.

    With g zero-padded to xp's size the circular correlation at lags d < k never wraps. Each sample's correlation is
    cropped to k before the batch sum, so a batch-sharded mesh all-reduces (k..., C) partials, not spectra."""
    size = xp.shape[1:-1]
    axes = tuple(range(2, 2 + len(k)))
    xt, gt = jnp.moveaxis(xp, -1, 1), jnp.moveaxis(g, -1, 1)  # (b, c, spatial...): transform the minor axes
    corr = jnp.fft.irfftn(jnp.fft.rfftn(xt, s=size, axes=axes) * jnp.conj(jnp.fft.rfftn(gt, s=size, axes=axes)),
                          s=size, axes=axes)
    corr = corr[(slice(None), slice(None)) + tuple(slice(0, kk) for kk in k)]
    return jnp.moveaxis(jnp.sum(corr, axis=0), 0, -1).reshape(k + (1, xp.shape[-1]))


def _depthwise_kernel_grad(x: Array, g: Array, k: tuple[int, ...]) -> Array:
    """dw[d..., c] = sum over (b, p...) of x_pad[b, p + d, c] * g[b, p, c], for a 2-D or 3-D depth-wise kernel k.

    XLA's own kernel gradient of a depth-wise conv is a dense (C x C) correlation whose diagonal is kept: C times the
    work, ~3.7 s of the MAE-base CPU step (notes/perf.md). 3-D kernels go through `_fft_kernel_grad`: 3.3x / 1.9x
    faster than the direct sums below at the two SAX-stem stages (2x48x48x16x64, 2x24x24x16x128), and closer to
    float64 (2e-7 vs 3e-6 relative). For 2-D kernels (LAX stems) the direct sums are as fast or faster: one
    variadic reduce per offset along the first kernel axis, over all the other offsets' products, which XLA fuses
    into the reduce loop (a plain sum of stacked products goes to a library reduce that materialises them);
    barriers keep the groups apart."""
    spatial = x.shape[1:-1]
    xp = _same_pad(x, k).astype(jnp.float32)
    g = g.astype(jnp.float32)
    if len(k) == 3:
        return _fft_kernel_grad(xp, g, k)
    rows = []
    for d0 in range(k[0]):
        if rows:
            xp, g = jax.lax.optimization_barrier((xp, g))
        prods = tuple(xp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip((d0,) + rest, spatial))] * g
                      for rest in itertools.product(*(range(kk) for kk in k[1:])))
        sums = jax.lax.reduce(prods, (np.float32(0),) * len(prods),  # over space; batch kept (see below)
                              lambda a, b: tuple(u + v for u, v in zip(a, b)), tuple(range(1, x.ndim - 1)))
        rows.append(jnp.stack(sums))
    # the batch sum is a plain reduce: on a batch-sharded mesh it becomes an all-reduce of (k..., C) partial sums,
    # where the SPMD partitioner would all-gather the per-device partials of a variadic reduce
    return jnp.sum(jnp.stack(rows), axis=2).reshape(k + (1, x.shape[-1]))


@jax.custom_vjp
def depthwise_same(x: Array, w: Array) -> Array:
    """Depth-wise conv, stride 1, 'SAME' padding, without XLA:CPU's grouped convolution (10-20x slower here in 3-D).

    Forward and input gradient are sums of shifted inputs times per-channel weights (fused loops; the input gradient
    uses the flipped kernel); the kernel gradient is `_depthwise_kernel_grad`. Autodiff of the taps would
    materialise ~10x more temporaries (+8 GB in the MAE-base step) (notes/perf.md)."""
    return _taps(_same_pad(x, w.shape[:-2]), w, x.shape[1:-1])


def _depthwise_fwd(x, w):
    return depthwise_same(x, w), (x, w)


def _depthwise_bwd(res, g):
    x, w = res
    k = w.shape[:-2]
    g_pad = jax.lax.optimization_barrier(_same_pad(g, k, flipped=True))
    dx = _taps(g_pad, w[tuple(slice(None, None, -1) for _ in k)], x.shape[1:-1])
    dx = jax.lax.optimization_barrier(dx)  # written in its own layout: a transposing consumer fused in is ~2x slower
    return dx, _depthwise_kernel_grad(x, g, k).astype(w.dtype)


depthwise_same.defvjp(_depthwise_fwd, _depthwise_bwd)
