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

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.models.conv_cpu import conv2d_valid, depthwise_same, lax_conv, xla_conv2d

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

    The tuned forms (`conv_cpu`: depth-wise taps, per-depth-tap 3-D convs) work around XLA:CPU's slow grouped and
    3-D conv emitters and were measured there only; GPU (cuDNN) and TPU run the standard convolution unless told
    otherwise."""
    impl = check_conv_impl(impl)
    if impl == "auto":
        return "tuned" if jax.default_backend() == "cpu" else "xla"
    return impl


FLAT_TAPS_MIN_CHANNELS = 32  # below it XLA's kernel gradient wins: the 'tiny' denoiser (C = 8) ran 1.3x slower


def conv2d(x: Array, w: Array, padding=((0, 0), (0, 0)), impl: str | None = None) -> Array:
    """Stride-1 2-D conv, (B, H, W, C) x (kh, kw, C, O), explicit padding ((lo, hi), (lo, hi)) or 'SAME'/'VALID'.

    'tuned' ('auto' on CPU) takes its kernel gradient through `conv_cpu.conv2d_valid` when 32 <= C <= O. For C > O
    (a 4C -> C projection) XLA's own was as fast or faster (0.20 vs 0.23 s at 512 -> 128), and with few channels
    (C = 8, the 'tiny' denoiser's) its thin matmuls lose (58 vs 80-97 ms a smoke step), so XLA's is kept there."""
    kh, kw, c, o = w.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    if resolve_conv_impl(impl) == "tuned" and kh * kw > 1 and FLAT_TAPS_MIN_CHANNELS <= c <= o:
        if any(p for pair in padding for p in pair):
            x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
        return conv2d_valid(x, w)
    return xla_conv2d(x, w, tuple(tuple(p) for p in padding))


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


class Conv(nn.Module):
    """Channel-last N-D conv with the parameters of `nn.Conv` ('kernel' (k..., in // groups, out), 'bias').

    Why not `nn.Conv`: XLA:CPU runs the stem's 3-D depth-wise 5x5x5 conv ~15x slower than the same math written as
    2-D convs (notes/perf.md). Same parameters, same results, cheaper lowerings: 1x1 convs are matmuls; kernel ==
    stride 'VALID' convs (patch embeddings, fusion down-projections) are patchify + matmul (any backend). Under
    `impl` 'tuned' (the 'auto' choice on CPU, `resolve_conv_impl`) depth-wise 'SAME' convs go through
    `conv_cpu.depthwise_same` and other 3-D convs with depth stride 1 run as per-depth-tap 2-D convs over (B*Z)
    (`conv_cpu.lax_conv`); everything else is `lax.conv_general_dilated`.
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
            y = depthwise_same(x, w)
        else:
            y = lax_conv(x, w, strides, pad, groups, tuned)
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
