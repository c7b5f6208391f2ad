"""Imaging transformers for 2D+T MRI denoising (SNRAware model family), Flax Linen, channel-last.

Layout: (B, X, Y, T, C). Input channels: real, imag (SNR units) and the g-factor map; output: denoised real, imag.
Why this design: the reference interleaves three attention patterns that see different neighbourhoods of a cine —
L (local: patches inside one spatial window attend to each other), G (global: the patches at the same position of
every window attend to each other, a strided view of the whole FOV) and T (temporal: frames attend to each other,
one token = a whole frame per head) — with convolutional q/k/v, cosine attention on normalised Q/K, a relative
position bias for local attention (global attention's window grid changes with the image size, so it relies on
the positional information of its convolutional q/k/v instead) and a convolutional mixer.
Cells are stacked by a block string per resolution level ("T1L1G1" = one temporal, one local, one global cell;
C = a 3x3x3 conv cell), levels joined by an HRNet
(all resolutions kept in parallel, exchanged at every stage) or a U-Net backbone. A conv stem and a residual head
wrap the backbone as in the reference model.

Spatial windows and patches are in pixels (x, y); a window larger than the feature map is clipped to it. Heads split
channels (width % heads == 0). Parameters carry logical axis names (design.md) for the shared mesh code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.layers import Conv

Dtype = Any

SIZES: dict[str, dict] = {
    # reference releases (base width 64; denoising override: window 8, patch 4, 64 heads, layer norm)
    "small": dict(width=64, block_str=("T1L1G1", "T1L1G1"), heads=64, window=(8, 8), patch=(4, 4)),
    "medium": dict(width=64, block_str=("T1L1G1T1L1G1", "T1L1G1T1L1G1"), heads=64, window=(8, 8), patch=(4, 4)),
    "large": dict(width=64, block_str=("T1L1G1T1L1G1T1L1G1T1L1G1",) * 2, heads=64, window=(8, 8), patch=(4, 4)),
    # CI-sized
    "tiny": dict(width=8, block_str=("T1L1G1", "T1L1G1"), heads=2, window=(8, 8), patch=(2, 2)),
}


def _init(fn, names):
    return nn.with_logical_partitioning(fn, names)


def _conv(features: int, kernel: Sequence[int], names: tuple, dtype: Dtype, name: str | None = None,
          strides: Sequence[int] | None = None) -> Conv:
    """Conv over (X, Y, T) with logical names (spatial dims None, then in, out)."""
    # layers.Conv: nn.Conv's parameters with CPU-friendly lowerings (kt == 1 kernels run as 2-D convs over B*T)
    return Conv(features, tuple(kernel), tuple(strides) if strides else None, "SAME", 1, dtype,
                kernel_init=_init(nn.initializers.lecun_normal(), (None, None, None) + tuple(names)),
                bias_init=_init(nn.initializers.zeros, (names[1],)), name=name)


def parse_block_str(block_str: str) -> list[str]:
    """'T1L1G1' -> ['T', 'L', 'G']; counts repeat a letter ('T2' -> T, T). Letters: T, L, G, C."""
    parts = re.findall(r"([TLGC])(\d+)", block_str)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != block_str:
        raise ValueError(f"bad block string {block_str!r}: use letters T, L, G, C each followed by a count")
    return [a for a, n in parts for _ in range(int(n))]


def _l2n(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _attend(q, k, v, bias=None, dropout=None):
    """Cosine attention: softmax(normalised q . normalised k + bias) v, over (..., N, D); softmax in float32."""
    att = jnp.einsum("...nd,...md->...nm", _l2n(q.astype(jnp.float32)), _l2n(k.astype(jnp.float32)))
    if bias is not None:
        att = att + bias
    att = jax.nn.softmax(att, axis=-1)
    if dropout is not None:
        att = dropout(att)
    return jnp.einsum("...nm,...md->...nd", att.astype(v.dtype), v)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (the reference's `dropout_p`), rng stream 'droppath'."""

    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate <= 0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("droppath"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head cosine attention in one of three patterns: 'temporal', 'local', 'global' over (B, X, Y, T, C)."""

    mode: str
    width: int
    heads: int
    window: tuple[int, int] = (8, 8)
    patch: tuple[int, int] = (4, 4)
    position_bias: bool = True
    att_dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, nx, ny, nt, _ = x.shape
        c, h = self.width, self.heads
        if c % h:
            raise ValueError(f"width {c} must be divisible by heads {h}")
        q, k, v = (_conv(c, (3, 3, 1), ("embed", "heads"), self.dtype, name=n)(x) for n in ("query", "key", "value"))
        drop = nn.Dropout(self.att_dropout, deterministic=not train) if self.att_dropout > 0 else None
        if self.mode == "temporal":
            def tokens(a):  # (B, X, Y, T, h, d) -> (B, h, T, X*Y*d)
                a = a.reshape(b, nx, ny, nt, h, c // h)
                return a.transpose(0, 4, 3, 1, 2, 5).reshape(b, h, nt, nx * ny * (c // h))

            y = _attend(tokens(q), tokens(k), tokens(v), dropout=drop)
            y = y.reshape(b, h, nt, nx, ny, c // h).transpose(0, 3, 4, 2, 1, 5).reshape(b, nx, ny, nt, c)
        elif self.mode in ("local", "global"):
            wx, wy = min(self.window[0], nx), min(self.window[1], ny)
            px, py = min(self.patch[0], wx), min(self.patch[1], wy)
            if nx % wx or ny % wy or wx % px or wy % py:
                raise ValueError(f"feature map {(nx, ny)} must tile into windows {(wx, wy)} of patches {(px, py)}")
            gx, gy, mx, my = nx // wx, ny // wy, wx // px, wy // py  # windows per axis, patches per window axis
            d = px * py * (c // h)

            def split(a):  # -> (B, T, h, gx, gy, mx, my, d)
                a = a.reshape(b, gx, mx, px, gy, my, py, nt, h, c // h)
                return a.transpose(0, 7, 8, 1, 4, 2, 5, 3, 6, 9).reshape(b, nt, h, gx, gy, mx, my, d)

            def merge(a):
                a = a.reshape(b, nt, h, gx, gy, mx, my, px, py, c // h)
                return a.transpose(0, 3, 5, 7, 4, 6, 8, 1, 2, 9).reshape(b, nx, ny, nt, c)

            qs, ks, vs = split(q), split(k), split(v)
            if self.mode == "local":  # tokens: the mx*my patches of one window
                to = lambda a: a.reshape(b, nt, h, gx * gy, mx * my, d)
                grid = (mx, my)
            else:  # tokens: the gx*gy windows, one set per patch position
                to = lambda a: a.transpose(0, 1, 2, 5, 6, 3, 4, 7).reshape(b, nt, h, mx * my, gx * gy, d)
                grid = (gx, gy)
            bias = None
            if self.position_bias and self.mode == "local":  # global grids vary with image size: no table
                table = self.param("relative_position_bias", _init(nn.initializers.truncated_normal(0.02),
                                                                   (None, "heads")),
                                   ((2 * grid[0] - 1) * (2 * grid[1] - 1), h))
                ix, iy = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
                ix, iy = ix.reshape(-1), iy.reshape(-1)
                idx = (ix[:, None] - ix[None, :] + grid[0] - 1) * (2 * grid[1] - 1) + (iy[:, None] - iy[None, :]
                                                                                     + grid[1] - 1)
                bias = jnp.asarray(table, jnp.float32)[idx].transpose(2, 0, 1)[:, None]  # (h, 1, N, N)
            y = _attend(to(qs), to(ks), to(vs), bias=bias, dropout=drop)
            if self.mode == "local":
                y = y.reshape(b, nt, h, gx, gy, mx, my, d)
            else:
                y = y.reshape(b, nt, h, mx, my, gx, gy, d).transpose(0, 1, 2, 5, 6, 3, 4, 7)
            y = merge(y)
        else:
            raise ValueError(f"unknown attention mode {self.mode!r}")
        return nn.Dense(c, dtype=self.dtype, name="output_proj",
                        kernel_init=_init(nn.initializers.lecun_normal(), ("heads", "embed")),
                        bias_init=_init(nn.initializers.zeros, ("embed",)))(y)


def _norm(dtype, name):
    return nn.LayerNorm(dtype=dtype, name=name, scale_init=_init(nn.initializers.ones, (None,)),
                        bias_init=_init(nn.initializers.zeros, (None,)))


class Cell(nn.Module):
    """Transformer cell: x = proj(x) + drop(attn(norm(x))); x = x + drop(mixer(norm(x))).

    Mixer: 5x5 conv (per frame) to mixer_ratio * width, PReLU, 5x5 conv back. 'C' cells replace attention by a
    3x3x3 conv.
    """

    kind: str
    width: int
    heads: int
    window: tuple[int, int]
    patch: tuple[int, int]
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    position_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.width
        skip = x if x.shape[-1] == c else _conv(c, (1, 1, 1), ("conv_in", "embed"), self.dtype, "input_proj")(x)
        y = _norm(self.dtype, "norm1")(x)
        if self.kind == "C":
            y = _conv(c, (3, 3, 3), ("embed", "mlp"), self.dtype, "conv")(y)
        else:
            mode = {"T": "temporal", "L": "local", "G": "global"}[self.kind]
            y = Attention(mode, c, self.heads, self.window, self.patch, self.position_bias, dtype=self.dtype,
                          name="attn")(y, train)
        x = skip + DropPath(self.drop_path)(y, train)
        hidden = int(self.mixer_ratio * c)
        y = _norm(self.dtype, "norm2")(x)
        y = _conv(hidden, (5, 5, 1), ("embed", "mlp"), self.dtype, "mixer_in")(y)
        y = nn.PReLU(name="act")(y.astype(jnp.float32)).astype(self.dtype)
        y = _conv(c, (5, 5, 1), ("mlp", "embed"), self.dtype, "mixer_out")(y)
        return x + DropPath(self.drop_path)(y, train)


class Block(nn.Module):
    """A sequence of cells given by a block string."""

    block_str: str
    width: int
    heads: int
    window: tuple[int, int]
    patch: tuple[int, int]
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        cell_cls = nn.remat(Cell, static_argnums=(2,)) if self.remat in ("block", "full") else Cell
        for i, kind in enumerate(parse_block_str(self.block_str)):
            x = cell_cls(kind, self.width, self.heads, self.window, self.patch, self.mixer_ratio, self.drop_path,
                         dtype=self.dtype, name=f"cell{i}")(x, train)
        return x


def _down(x, width, dtype, name):
    """Spatial /2 (T kept): strided 3x3 conv."""
    return _conv(width, (3, 3, 1), ("conv_in", "conv_out"), dtype, name, strides=(2, 2, 1))(x)


def _up(x, width, factor, dtype, name):
    """Spatial x factor (T kept): linear resize then 1x1 conv to `width`."""
    b, nx, ny, nt, c = x.shape
    x = jax.image.resize(x, (b, nx * factor, ny * factor, nt, c), "linear")
    return _conv(width, (1, 1, 1), ("conv_in", "conv_out"), dtype, name)(x)


def _resample(x, src: int, dst: int, width: int, dtype, name: str):
    if src == dst:
        return x if x.shape[-1] == width else _conv(width, (1, 1, 1), ("conv_in", "conv_out"), dtype, name)(x)
    if dst > src:  # to a coarser level: repeated strided convs
        for i in range(dst - src):
            x = _down(x, width, dtype, f"{name}_d{i}")
        return x
    return _up(x, width, 2 ** (src - dst), dtype, name)


class HRNet(nn.Module):
    """HRNet backbone: stage s runs one block per level 0..s (level i at 1/2^i resolution, width * 2^i); each
    block's input is the sum of every previous-stage branch resampled to its level; the outputs of all levels are
    fused per level, projected and concatenated at full resolution (channels = width * levels)."""

    block_str: tuple[str, ...]
    width: int
    heads: int
    window: tuple[int, int]
    patch: tuple[int, int]
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        levels = len(self.block_str)
        widths = [self.width * 2 ** i for i in range(levels)]
        kw = dict(heads=self.heads, window=self.window, patch=self.patch, mixer_ratio=self.mixer_ratio,
                  drop_path=self.drop_path, remat=self.remat, dtype=self.dtype)
        branches = [Block(self.block_str[0], widths[0], name="B0_0", **kw)(x, train)]
        for s in range(1, levels):
            new = []
            for i in range(s + 1):
                inp = sum(_resample(br, j, i, widths[i], self.dtype, f"x{s}_{j}to{i}") for j, br in enumerate(branches))
                new.append(Block(self.block_str[i], widths[i], name=f"B{i}_{s}", **kw)(inp, train))
            branches = new
        outs = []
        for i in range(levels):
            y = sum(_resample(br, j, i, widths[i], self.dtype, f"fuse_{j}to{i}") for j, br in enumerate(branches))
            y = _conv(self.width, (3, 3, 1), ("conv_in", "embed"), self.dtype, f"output_B{i}")(y)
            outs.append(y if i == 0 else _up(y, self.width, 2 ** i, self.dtype, f"up_out{i}"))
        return jnp.concatenate(outs, axis=-1)


class UNet(nn.Module):
    """U-Net backbone: a block per level down (width * 2^i), strided-conv downsampling, linear upsampling, skip
    connections gated by a sigmoid channel attention from the decoder features (the reference's unet attention);
    output at full resolution with `width` channels."""

    block_str: tuple[str, ...]
    width: int
    heads: int
    window: tuple[int, int]
    patch: tuple[int, int]
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        levels = len(self.block_str)
        widths = [self.width * 2 ** i for i in range(levels)]
        kw = dict(heads=self.heads, window=self.window, patch=self.patch, mixer_ratio=self.mixer_ratio,
                  drop_path=self.drop_path, remat=self.remat, dtype=self.dtype)
        skips = []
        for i in range(levels):
            if i > 0:
                x = _down(x, widths[i], self.dtype, f"down{i}")
            x = Block(self.block_str[i], widths[i], name=f"enc{i}", **kw)(x, train)
            skips.append(x)
        for i in range(levels - 2, -1, -1):
            x = _up(x, widths[i], 2, self.dtype, f"up{i}")
            gate = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
            gate = nn.sigmoid(_conv(widths[i], (1, 1, 1), ("conv_in", "conv_out"), self.dtype, f"gate{i}")(gate))
            x = jnp.concatenate([x, skips[i] * gate], axis=-1)
            x = Block(self.block_str[i], widths[i], name=f"dec{i}", **kw)(x, train)
        return x


class DenoisingModel(nn.Module):
    """Stem conv (3 -> width), backbone, residual (stem added to the first `width` backbone channels), head conv to
    (real, imag). Input (B, X, Y, T, 3) = real, imag, g-map in SNR units; output (B, X, Y, T, 2) float32."""

    backbone: str = "hrnet"
    width: int = 64
    block_str: tuple[str, ...] = ("T1L1G1", "T1L1G1")
    heads: int = 64
    window: tuple[int, int] = (8, 8)
    patch: tuple[int, int] = (4, 4)
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    out_channels: int = 2
    dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, image, train: bool = False):
        x = image.astype(self.dtype)
        stem = _conv(self.width, (3, 3, 3), ("conv_in", "embed"), self.dtype, "pre")(x)
        cls = {"hrnet": HRNet, "unet": UNet}.get(self.backbone)
        if cls is None:
            raise ValueError(f"unknown backbone {self.backbone!r}; use 'hrnet' or 'unet'")
        y = cls(tuple(self.block_str), self.width, self.heads, tuple(self.window), tuple(self.patch),
                self.mixer_ratio, self.drop_path, self.remat, self.dtype, name="backbone")(stem, train)
        y = jnp.concatenate([y[..., : self.width] + stem, y[..., self.width:]], axis=-1)
        out = _conv(self.out_channels, (3, 3, 3), ("embed", "conv_out"), self.dtype, "post")(y)
        return out.astype(jnp.float32)


def make_model(size: str = "small", backbone: str = "hrnet", dtype: Dtype = jnp.float32, remat: str = "none",
               **overrides) -> DenoisingModel:
    """A DenoisingModel of a named size ('tiny', 'small', 'medium', 'large'), fields overridable."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {sorted(SIZES)}")
    kw = dict(SIZES[size])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["block_str"] = tuple(kw["block_str"])
    kw["window"], kw["patch"] = tuple(kw["window"]), tuple(kw["patch"])
    return DenoisingModel(backbone=backbone, dtype=dtype, remat=remat, **kw)
