"""Building blocks shared by the CineMA models (Flax Linen, channel-last).

Why Linen: every model here is a pure function of a `params` pytree, so weight conversion from the PyTorch reference,
logical-axis sharding (`nn.with_logical_partitioning`), Orbax checkpoints, encoder surgery and layer-wise lr decay
are plain pytree operations (docs/design.md).

Numerics follow the reference: exact (erf) GELU, LayerNorm with the two-pass variance (eps 1e-5 in transformers,
1e-6 in conv blocks), xavier-uniform Linear layers with zero bias, PyTorch-default conv init (uniform with bound
1/sqrt(fan_in) for kernel and bias), attention with a separate `q` projection and a fused `kv` projection (k first,
then v) and scale head_dim**-0.5 computed by `jax.nn.dot_product_attention` so cuDNN/flash kernels can be chosen.
Because the layout is channel-last, a "channel LayerNorm" is an ordinary LayerNorm over the last axis.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

zeros = nn.initializers.zeros
ones = nn.initializers.ones


# Counter-based initializers. Why: on XLA:CPU every `jax.random.uniform/normal` call compiles its own unrolled
# threefry (~0.15 s each on 2 cores), so the ~200 parameters of even a tiny CineMA took 20+ s just to compile
# `model.init`. These draw the same distributions from an integer hash of (per-parameter key, element index):
# a handful of elementwise ops that compile in milliseconds. Parameter keys still come from Flax's 'params' stream.
def _mix32(x: Array) -> Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _unit_uniform(key: Array, n: int, stream: int = 0) -> Array:
    """n floats in [0, 1) (24-bit) from a hash of the key and the element index."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key).reshape(-1).astype(jnp.uint32)
    seed = jnp.uint32((0x9E3779B9 + stream * 0x632BE5AB) & 0xFFFFFFFF)
    for i in range(words.shape[0]):
        seed = _mix32(seed ^ words[i])
    bits = _mix32(_mix32(jax.lax.iota(jnp.uint32, n) ^ seed) + seed * jnp.uint32(0x27D4EB2F))
    return (bits >> 8).astype(jnp.float32) * (1.0 / 16777216.0)


def uniform_init(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        u = _unit_uniform(key, math.prod(shape)).reshape(shape)
        return (low + (high - low) * u).astype(dtype)

    return init


def normal_init(std: float):
    """N(0, std^2) by Box-Muller from two hashed uniform streams."""

    def init(key, shape, dtype=jnp.float32):
        n = math.prod(shape)
        u1 = 1.0 - _unit_uniform(key, n, 1)  # (0, 1]
        u2 = _unit_uniform(key, n, 2)
        z = jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)
        return (std * z).reshape(shape).astype(dtype)

    return init


def xavier_uniform(key, shape, dtype=jnp.float32):
    """Glorot uniform for a (in, out) Dense kernel: bound sqrt(6 / (fan_in + fan_out))."""
    fan_in = math.prod(shape[:-1])
    fan_out = shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_init(-bound, bound)(key, shape, dtype)


def boxed(init, names: tuple):
    """Annotate an initializer with logical axis names (design.md)."""
    return nn.with_logical_partitioning(init, names)


def torch_conv_bias_init(fan_in: int):
    """PyTorch default Conv init (kaiming_uniform(a=sqrt(5)) kernel and bias): uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return uniform_init(-bound, bound)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as torch's nn.GELU(). Written with erf: XLA:CPU runs `nn.gelu(approximate=False)`'s erfc
    form ~4x slower forward; the values agree to ~6e-7."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype)))


def dense(features: int, names: tuple, dtype: Dtype = jnp.float32, use_bias: bool = True,
          name: str | None = None) -> nn.Dense:
    """Linear layer with xavier-uniform kernel, zero bias and logical names (in_name, out_name)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=boxed(xavier_uniform, names), bias_init=boxed(zeros, (None,)), name=name)


def layer_norm(eps: float, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last (channel) axis, reference-exact (two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        scale_init=boxed(ones, (None,)), bias_init=boxed(zeros, (None,)), name=name)


def conv(features: int, kernel: Sequence[int], in_features: int, dtype: Dtype = jnp.float32,
         strides: Sequence[int] | None = None, padding: str = "SAME", groups: int = 1,
         name: str | None = None, impl: str = "auto") -> Conv:
    """N-D conv (channel-last) with PyTorch-default init and logical names (spatial None, conv_in, conv_out)."""
    kernel = tuple(int(k) for k in kernel)
    fan_in = (in_features // groups) * math.prod(kernel)
    spatial = (None,) * len(kernel)
    return Conv(features, kernel, tuple(int(s) for s in strides) if strides is not None else None, padding, groups,
                dtype, kernel_init=boxed(torch_conv_bias_init(fan_in), spatial + ("conv_in", "conv_out")),
                bias_init=boxed(torch_conv_bias_init(fan_in), (None,)), impl=impl, name=name)


CONV_IMPLS = ("auto", "tuned", "xla")


def check_conv_impl(impl: str | None) -> str:
    """The `Conv.impl` name (None = 'auto'), or a ValueError naming the choices; touches no backend."""
    impl = "auto" if impl is None else impl
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv implementation must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def resolve_conv_impl(impl: str | None) -> str:
    """'tuned' or 'xla' for a `Conv.impl` setting; 'auto' (or None) is 'tuned' on the CPU backend, else 'xla'.

    The tuned forms (`_depthwise_same`, per-depth-tap 3-D convs) work around XLA:CPU's slow grouped and 3-D conv
    emitters and were measured there only; GPU (cuDNN) and TPU run the standard convolution unless told otherwise."""
    impl = check_conv_impl(impl)
    if impl == "auto":
        return "tuned" if jax.default_backend() == "cpu" else "xla"
    return impl


_CONV_DIMS = {1: ("NHC", "HIO", "NHC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NHWDC", "HWDIO", "NHWDC")}


def _depth_planes_conv(x: Array, w: Array, strides: tuple[int, ...], padding, groups: int) -> Array:
    """3-D conv (depth stride 1) as 2-D convs over (B*Z) of depth-shifted input planes.

    groups == 1: one 2-D conv whose input channels stack the kz shifted planes (kz*C, depth-tap major), kernel
    (kx, ky, kz*C, O); its kernel gradient is then one wide XLA conv instead of kz narrow ones (ConvUNetR 3x3x3,
    forward + backward under the checkpoint of `_lax_conv`: 1.45 vs 1.62 s at 2x192x192x16x32, 1.14 vs 1.42 s at
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
        y = _lax_conv(stack, w.reshape(w.shape[:2] + (kz * c, w.shape[-1])), strides[:2], pad2, 1)
        return y.reshape((b, nz) + y.shape[1:]).transpose(0, 2, 3, 1, 4)
    y = None
    for dz in range(kz):
        plane = planes[:, dz:dz + nz].reshape(b * nz, nx, ny, c)
        t = _lax_conv(plane, w[:, :, dz], strides[:2], pad2, groups)
        y = t if y is None else y + t
    return y.reshape((b, nz) + y.shape[1:]).transpose(0, 2, 3, 1, 4)


def _flat_taps_kernel_grad(xp: Array, g: Array, k: tuple[int, int]) -> Array:
    """dw[i, j] = sum over (b, p, q) of xp[b, p + i, q + j, :]^T g[b, p, q, :] for a VALID stride-1 2-D conv.

    With g zero-padded to xp's (H, W), each image flattens to (H*W, C) rows, and tap (i, j) is the row offset
    i*W + j: g's padding zeroes every product that would wrap into the next row. So each tap is a batched matmul of
    contiguous row slices, (C x HW) @ (HW x O) per image, summed over images (`_conv2d_valid`). The slices are
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


def _xla_conv2d(x: Array, w: Array, padding="VALID") -> Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_CONV_DIMS[2])


@jax.custom_vjp
def _conv2d_valid(x: Array, w: Array) -> Array:
    """VALID stride-1 2-D conv: XLA's forward and input gradient, the kernel gradient by `_flat_taps_kernel_grad`.

    XLA:CPU computes the kernel gradient as a convolution whose window is the whole image (64x64 for the denoiser),
    at ~70 GFLOP/s where a matmul runs at ~190: 62 % of the traced op time of the denoiser's step (notes/perf.md).
    Isolated, the row-slice matmuls were 2.5-3x faster for C <= O; in the whole step, 11-15 %."""
    return _xla_conv2d(x, w)


def _conv2d_valid_fwd(x, w):
    return _xla_conv2d(x, w), (x, w)


def _conv2d_valid_bwd(res, g):
    x, w = res
    dw = _flat_taps_kernel_grad(x, g, w.shape[:2]).astype(w.dtype)
    dw, g = jax.lax.optimization_barrier((dw, g))  # kernel gradient first: x is freed before dx is made
    dx = jax.vjp(lambda a: _xla_conv2d(a, w), x)[1](g)[0]
    return dx, dw


_conv2d_valid.defvjp(_conv2d_valid_fwd, _conv2d_valid_bwd)


FLAT_TAPS_MIN_CHANNELS = 32  # below it XLA's kernel gradient wins: the 'tiny' denoiser (C = 8) ran 1.3x slower


def conv2d(x: Array, w: Array, padding=((0, 0), (0, 0)), impl: str | None = None) -> Array:
    """Stride-1 2-D conv, (B, H, W, C) x (kh, kw, C, O), explicit padding ((lo, hi), (lo, hi)) or 'SAME'/'VALID'.

    'tuned' ('auto' on CPU) takes its kernel gradient through `_conv2d_valid` when 32 <= C <= O. For C > O (a 4C -> C
    projection) XLA's own was as fast or faster (0.20 vs 0.23 s at 512 -> 128), and with few channels (C = 8, the
    'tiny' denoiser's) its thin matmuls lose (58 vs 80-97 ms a smoke step), so XLA's is kept there."""
    kh, kw, c, o = w.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    if resolve_conv_impl(impl) == "tuned" and kh * kw > 1 and FLAT_TAPS_MIN_CHANNELS <= c <= o:
        if any(p for pair in padding for p in pair):
            x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
        return _conv2d_valid(x, w)
    return _xla_conv2d(x, w, tuple(tuple(p) for p in padding))


def _lax_conv(x: Array, w: Array, strides: tuple[int, ...], padding, groups: int, tuned: bool = True) -> Array:
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
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_CONV_DIMS[nd],
                                        feature_group_count=groups)


def _patch_matmul(x: Array, w: Array) -> Array:
    """Conv with kernel == stride, VALID: non-overlapping patches (x, y, z, c order) @ kernel (k..., in, out)."""
    k = w.shape[:-2]
    nd = len(k)
    b, c = x.shape[0], x.shape[-1]
    grid = [s // kk for s, kk in zip(x.shape[1:-1], k)]
    x = x[(slice(None),) + tuple(slice(0, g * kk) for g, kk in zip(grid, k))]  # VALID drops the remainder
    shape = [b]
    for g, kk in zip(grid, k):
        shape += [g, kk]
    x = x.reshape(shape + [c])
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    x = x.transpose(perm).reshape([b] + grid + [math.prod(k) * c])
    return jnp.dot(x, w.reshape(-1, w.shape[-1]))


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
def _depthwise_same(x: Array, w: Array) -> Array:
    """Depth-wise conv, stride 1, 'SAME' padding, without XLA:CPU's grouped convolution (10-20x slower here in 3-D).

    Forward and input gradient are sums of shifted inputs times per-channel weights (fused loops; the input gradient
    uses the flipped kernel); the kernel gradient is `_depthwise_kernel_grad`. Autodiff of the taps would
    materialise ~10x more temporaries (+8 GB in the MAE-base step) (notes/perf.md)."""
    return _taps(_same_pad(x, w.shape[:-2]), w, x.shape[1:-1])


def _depthwise_fwd(x, w):
    return _depthwise_same(x, w), (x, w)


def _depthwise_bwd(res, g):
    x, w = res
    k = w.shape[:-2]
    g_pad = jax.lax.optimization_barrier(_same_pad(g, k, flipped=True))
    dx = _taps(g_pad, w[tuple(slice(None, None, -1) for _ in k)], x.shape[1:-1])
    dx = jax.lax.optimization_barrier(dx)  # written in its own layout: a transposing consumer fused in is ~2x slower
    return dx, _depthwise_kernel_grad(x, g, k).astype(w.dtype)


_depthwise_same.defvjp(_depthwise_fwd, _depthwise_bwd)


class Conv(nn.Module):
    """Channel-last N-D conv with the parameters of `nn.Conv` ('kernel' (k..., in // groups, out), 'bias').

    Why not `nn.Conv`: XLA:CPU runs the stem's 3-D depth-wise 5x5x5 conv ~15x slower than the same math written as
    2-D convs (notes/perf.md). Same parameters, same results, cheaper lowerings: 1x1 convs are matmuls; kernel ==
    stride 'VALID' convs (patch embeddings, fusion down-projections) are patchify + matmul (any backend). Under
    `impl` 'tuned' (the 'auto' choice on CPU, `resolve_conv_impl`) depth-wise 'SAME' convs go through
    `_depthwise_same` and other 3-D convs with depth stride 1 run as per-depth-tap 2-D convs over (B*Z); everything
    else is `lax.conv_general_dilated`.
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: str = "SAME"
    feature_group_count: int = 1
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    bias_init: Any = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        tuned = resolve_conv_impl(self.impl) == "tuned"
        k = tuple(self.kernel_size)
        nd = len(k)
        cin = x.shape[-1]
        groups = self.feature_group_count
        if x.ndim != nd + 2:
            raise ValueError(f"conv with a {nd}-D kernel expects (B, *spatial, C) input, got shape {x.shape}")
        if cin % groups:
            raise ValueError(f"input channels {cin} not divisible by feature_group_count {groups}")
        kernel = self.param("kernel", self.kernel_init, k + (cin // groups, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        w = jnp.asarray(kernel, self.dtype)
        strides = tuple(self.strides) if self.strides is not None else (1,) * nd
        pad = self.padding.upper() if isinstance(self.padding, str) else self.padding
        if groups == 1 and all(v == 1 for v in k + strides):
            y = jnp.dot(x, w.reshape(cin, self.features))
        elif groups == 1 and strides == k and pad == "VALID":
            y = _patch_matmul(x, w)
        elif tuned and groups == cin == self.features and all(v == 1 for v in strides) and pad == "SAME":
            y = _depthwise_same(x, w)
        else:
            y = _lax_conv(x, w, strides, pad, groups, tuned)
        return y + jnp.asarray(bias, self.dtype)


class PatchConvTranspose(nn.Module):
    """Transposed conv with kernel == stride (non-overlapping), as the reference's ConvTranspose(k=s).

    Each input voxel is expanded into one output block: y[b, i*s+p, ...] = sum_c x[b, i, ..., c] W[p, ..., c, o] + b.
    Kernel layout (k..., in, out); the converter maps the PyTorch (in, out, k...) weight by a plain transpose.
    """

    features: int
    kernel: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = tuple(int(v) for v in self.kernel)
        nd = len(k)
        cin = x.shape[-1]
        # PyTorch ConvTranspose init: fan_in is computed from weight.size(1) * prod(k) = out_chans * prod(k).
        fan_in = self.features * math.prod(k)
        spatial = (None,) * nd
        w = self.param("kernel", boxed(torch_conv_bias_init(fan_in), spatial + ("conv_in", "conv_out")),
                       k + (cin, self.features), jnp.float32)
        b = self.param("bias", boxed(torch_conv_bias_init(fan_in), (None,)), (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        w = jnp.asarray(w, self.dtype)
        batch = x.shape[0]
        grid = x.shape[1:-1]
        letters = "xyzw"[:nd]
        klet = "pqrs"[:nd]
        spec = f"n{letters}c,{klet}co->n" + "".join(a + b_ for a, b_ in zip(letters, klet)) + "o"
        y = jnp.einsum(spec, x, w)
        y = y.reshape((batch,) + tuple(g * kk for g, kk in zip(grid, k)) + (self.features,))
        return y + jnp.asarray(b, self.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm DropPath), rng stream 'droppath'."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("droppath"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
    """Transformer MLP: fc1 (embed->mlp), exact GELU, fc2 (mlp->embed)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = dense(self.hidden, ("embed", "mlp"), self.dtype, name="fc1")(x)
        x = gelu(x)
        return dense(d, ("mlp", "embed"), self.dtype, name="fc2")(x)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array) -> Array:
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, heads, T, head_dim): one matmul per (b, h)
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bhkd->bhqd", p, vh, preferred_element_type=jnp.float32).astype(q.dtype)
    return jnp.swapaxes(o, 1, 2), (qh, kh, vh, p, o)


def _attention_bwd(res, g):
    qh, kh, vh, p, o = res
    f32 = jnp.float32
    gh = jnp.swapaxes(g, 1, 2)
    dv = jnp.einsum("bhqk,bhqd->bhkd", p, gh, preferred_element_type=f32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", gh, vh, preferred_element_type=f32)
    ds = (p * (dp - jnp.sum(gh.astype(f32) * o.astype(f32), -1, keepdims=True))).astype(qh.dtype)
    scale = qh.shape[-1] ** -0.5
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=f32) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qh, preferred_element_type=f32) * scale
    return tuple(jnp.swapaxes(d, 1, 2).astype(a.dtype) for d, a in ((dq, qh), (dk, kh), (dv, vh)))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: Array, k: Array, v: Array, impl: str | None = None) -> Array:
    """Softmax attention over (B, T, heads, head_dim) inputs, no mask; scale 1/sqrt(head_dim).

    impl None / 'explicit': head-major einsums with a hand-written gradient that keeps the softmax probabilities.
    On XLA:CPU this runs the MAE-base decoder's cross-attention ~1.7x faster forward+backward than
    `jax.nn.dot_product_attention`, whose token-major einsums and autodiff add transposes of the (q, k) scores
    (notes/perf.md). 'xla' / 'cudnn': `jax.nn.dot_product_attention` with that implementation (cudnn: GPU flash)."""
    if impl in (None, "explicit"):
        return _attention(q, k, v)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation must be 'explicit', 'xla' or 'cudnn', got {impl!r}")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class Attention(nn.Module):
    """Multi-head attention with a separate q projection and a fused kv projection (k first, then v).

    `kv_input=None` is self-attention; otherwise queries attend to `kv_input` (cross-attention, CrossMAE decoder).
    """

    n_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, kv_input: Array | None = None) -> Array:
        if kv_input is None:
            kv_input = x
        batch, n_q, dim = x.shape
        n_k = kv_input.shape[1]
        if dim % self.n_heads:
            raise ValueError(f"embed dim {dim} is not divisible by n_heads {self.n_heads}")
        hd = dim // self.n_heads
        q = nn.Dense(dim, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=boxed(xavier_uniform, ("embed", "heads")), bias_init=boxed(zeros, (None,)),
                     name="q")(x)
        kv = nn.Dense(2 * dim, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=boxed(xavier_uniform, ("embed", "kv")), bias_init=boxed(zeros, (None,)),
                      name="kv")(kv_input)
        q = q.reshape(batch, n_q, self.n_heads, hd)
        kv = kv.reshape(batch, n_k, 2, self.n_heads, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        out = attention(q, k, v, self.attention_impl)
        out = out.reshape(batch, n_q, dim)
        return dense(dim, ("heads", "embed"), self.dtype, name="proj")(out)


@jax.custom_vjp
def grad_barrier(x: Array) -> Array:
    """Identity whose cotangent is materialised (an optimization barrier in the backward pass).

    At a transformer block's inputs it stops XLA fusing the residual stream's cotangent sum across blocks: without
    it XLA:CPU re-derived that sum, every block's LayerNorm backward included, inside each block's consumers, so the
    work grew with depth squared (2.8 s of a 15.9 s MAE-base CPU step under remat 'none'; notes/perf.md)."""
    return x


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class Block(nn.Module):
    """Pre-norm transformer block: q += Attn(LN(q), kv); q += MLP(LN(q)); keys are NOT normalised (reference)."""

    n_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, kv_input: Array | None = None, deterministic: bool = True) -> Array:
        dim = x.shape[-1]
        x = grad_barrier(x)
        if kv_input is not None:
            kv_input = grad_barrier(kv_input)
        h = layer_norm(self.norm_eps, self.dtype, name="norm1")(x)
        h = Attention(self.n_heads, self.qkv_bias, self.dtype, self.attention_impl, name="attn")(h, kv_input)
        x = x + DropPath(self.drop_path, name="drop_path1")(h, deterministic)
        h = layer_norm(self.norm_eps, self.dtype, name="norm2")(x)
        h = Mlp(int(dim * self.mlp_ratio), self.dtype, name="mlp")(h)
        x = x + DropPath(self.drop_path, name="drop_path2")(h, deterministic)
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


def remat_wrap(module_cls, remat: str, static_argnums: tuple[int, ...]):
    """`module_cls` wrapped for a remat policy: 'block' / 'full' recompute the whole module in backward; 'dots' keeps
    its weight-matmul outputs and recomputes only the rest (norms, activations, attention), trading ~40 MB per
    MAE-base decoder block and sample for most of the recompute; 'none' returns the class as is."""
    if remat in ("block", "full"):
        return nn.remat(module_cls, static_argnums=static_argnums)
    if remat == "dots":
        return nn.remat(module_cls, static_argnums=static_argnums,
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if remat not in ("none", "", None):
        raise ValueError(f"remat must be 'none', 'block', 'dots' or 'full', got {remat!r}")
    return module_cls


def block_class(remat: str):
    """Transformer block class for a remat policy (`remat_wrap`)."""
    return remat_wrap(Block, remat, static_argnums=(3,))  # argument 0 is the module: (self, x, kv_input, deterministic)
