"""Imaging transformers for 2D+T MRI denoising (SNRAware model family), Flax Linen, channel-last.

Layout: (B, X, Y, T, C) in and out (input channels: real, imag in SNR units and the g-factor map; output: denoised
real, imag). Inside, tensors are (B, T, X, Y, C): every conv and norm works per frame, so frames fold into the batch
by a free reshape instead of a transpose per layer (a third of the CPU compile time).

The structure reproduces the released SNRAware denoiser parameter for parameter (`cinema_jax.convert_snraware` loads
its weights; tests/models/test_snraware_parity.py checks the outputs against the reference code):

* every conv works per frame in (X, Y) with reflect padding (3x3 unless noted); stem `pre` 3 -> width, head `post`
  -> 2 channels, the stem output added to the first `width` backbone channels (residual);
* a cell is pre-norm: x = proj(x) + drop(attn(norm1(x))); x = x + drop(mixer(norm2(x))). The norm is a LayerNorm
  over (X, Y, C) of each frame with an elementwise affine of shape (X, Y, C); the mixer is conv 3x3 -> mixer_ratio *
  width, PReLU (one slope), conv 3x3 back; `proj` is a 3x3 conv when the cell changes the width, else identity;
* attention: 3x3 conv q/k/v, cosine attention (unit-normalised q and k, no temperature), a relative position bias
  added to the attention weights after the softmax, a 3x3 conv output projection. Three patterns (the block
  string "T1L1G1" = one temporal, one local, one global cell; the digit is the reference's mixer flag, not a count):
  T: the frames of a series attend to each other; heads split the channels, a token is a whole frame of a head's
     channels; no position bias.
  L: an image is cut into windows of patches; the patches of one window attend to each other (bias over the patch
     grid). Fixed: patch size and patches per window.
  G: the patches at the same position of every window attend to each other (a strided view of the whole frame; bias
     over the window grid). Fixed: number of windows and patch size.
  For L and G a token is one patch, features ordered (px, py, C); heads split that vector into contiguous chunks;
* HRNet (the released backbone, 1-2 levels here): level i runs at 1/2^i resolution with width * 2^i channels;
  downsampling = 2x2 space-to-depth + 1x1 conv, upsampling = bilinear x2 + 3x3 conv; output blocks per level,
  concatenated at full resolution (width * (2^levels - 1) channels). U-Net (1-2 levels): encoder blocks, a bridge,
  decoder blocks fed [gated skip, upsampled] where the gate is sigmoid(1x1(relu(1x1(up) + 1x1(skip)))).

Window/patch sizes are given in pixels for the top level and adapted per block from the construction image size
(`image_size`, the reference's training cutout, 64x64) exactly as the reference does. Because the norms carry
per-pixel affine parameters and G attention a fixed window count, the network itself runs on `image_size` tiles
only: `DenoisingModel` cuts larger inputs into overlapping tiles (overlap `tile_overlap`, default a quarter of a
tile, the reference's 16 of 64 pixels), runs them as one batch and averages the overlaps; smaller inputs are padded
(reflect) to a tile. T is not tiled (the reference inference also tiles T into 16-frame chunks; here the temporal
attention sees every frame given). Parameters carry logical axis names (design.md) for the shared mesh code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.layers import (
    DropPath,
    boxed,
    conv2d,
    grad_barrier,
    normal_init,
    ones,
    remat_wrap,
    torch_conv_bias_init,
    zeros,
)

Dtype = Any

SIZES: dict[str, dict] = {
    # reference releases (denoising override: width 64, window 8, patch 4, 64 heads, layer norm, cutout 64x64)
    "small": dict(width=64, block_str=("T1L1G1", "T1L1G1"), heads=64, window=(8, 8), patch=(4, 4),
                  image_size=(64, 64)),
    "medium": dict(width=64, block_str=("T1L1G1T1L1G1",) * 2, heads=64, window=(8, 8), patch=(4, 4),
                   image_size=(64, 64)),
    "large": dict(width=64, block_str=("T1L1G1T1L1G1T1L1G1T1L1G1",) * 2, heads=64, window=(8, 8), patch=(4, 4),
                  image_size=(64, 64)),
    # CI-sized
    "tiny": dict(width=8, block_str=("T1L1G1", "T1L1G1"), heads=2, window=(8, 8), patch=(2, 2), image_size=(32, 32)),
}
MAX_LEVELS = 2  # the released configurations use two resolution levels

_KINDS = {"T": "temporal", "L": "local", "G": "global"}


def parse_block_str(block_str: str) -> list[str]:
    """'T1L1G1' -> ['T', 'L', 'G']: pairs of an attention letter and the reference's mixer digit (one cell each).

    Letters: T (temporal), L (local), G (global); the digit 3 selects the reference's 3-D variants of L/G, which
    the released denoisers do not use and which are not implemented."""
    pairs = re.findall(r"([A-Za-z])(\d)", block_str)
    if not pairs or "".join(a + d for a, d in pairs) != block_str:
        raise ValueError(f"bad block string {block_str!r}: use pairs of a letter (T, L, G) and a digit, e.g. T1L1G1")
    out = []
    for a, d in pairs:
        if a not in _KINDS:
            raise ValueError(f"block string {block_str!r}: cell type {a!r} is not implemented (T, L, G)")
        if a in "LG" and d == "3":
            raise ValueError(f"block string {block_str!r}: 3-D attention {a}3 is not implemented")
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Attention tiling of one block: L uses `local_grid` patches (per axis) of `local_patch` pixels per window; G
    uses `global_grid` windows (per axis) with patches of `global_patch` pixels."""

    local_grid: tuple[int, int]
    local_patch: tuple[int, int]
    global_grid: tuple[int, int]
    global_patch: tuple[int, int]


def _keep_num_windows(hw, n_wind, n_patch) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window/patch sizes that keep (at least 2) windows per axis and (at least 2) patches per window."""
    n_wind = [max(n, 2) for n in n_wind]
    n_patch = [max(n, 2) for n in n_patch]
    window = [max(s // n, 1) for s, n in zip(hw, n_wind)]
    patch = [max(w // n, 1) for w, n in zip(window, n_patch)]
    return tuple(window), tuple(patch)


def _keep_window_size(hw, window, patch) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keep the window/patch pixel sizes unless fewer than 2 windows (patches) would fit; then halve the extent."""
    window = [w if s // w >= 2 else max(s // 2, 1) for s, w in zip(hw, window)]
    patch = [p if w // p >= 2 else max(w // 2, 1) for w, p in zip(window, patch)]
    return tuple(window), tuple(patch)


def block_geometry(hw: Sequence[int], window: Sequence[int], patch: Sequence[int]) -> Geometry:
    """The L and G tilings the reference derives for a block of image size `hw` and window/patch pixel sizes.

    G gets twice as many windows as L and half as many patches per window."""
    hw = tuple(int(s) for s in hw)
    n_wind = [max(s // w, 1) for s, w in zip(hw, window)]
    n_patch = [max(w // p, 1) for w, p in zip(window, patch)]
    lwin = [max(s // n, 1) for s, n in zip(hw, n_wind)]
    lpatch = [max(w // n, 1) for w, n in zip(lwin, n_patch)]
    g_patches = [n // 2 for n in n_patch]
    if min(g_patches) < 1:
        raise ValueError(f"window {tuple(window)} / patch {tuple(patch)} at image size {hw}: a window needs at least "
                         "2 patches per axis for global attention")
    gwin = [max(s // (2 * n), 1) for s, n in zip(hw, n_wind)]
    gpatch = [max(w // n, 1) for w, n in zip(gwin, g_patches)]
    for s, w, p in list(zip(hw, lwin, lpatch)) + list(zip(hw, gwin, gpatch)):
        if s % w or w % p:
            raise ValueError(f"image size {hw} does not tile into windows {w} of patches {p}")
    return Geometry(tuple(w // p for w, p in zip(lwin, lpatch)), tuple(lpatch),
                    tuple(s // w for s, w in zip(hw, gwin)), tuple(gpatch))


def level_sizes(image_size, window, patch, levels: int, backbone: str) -> dict[str, tuple[int, int, Geometry]]:
    """Block name -> (X, Y, geometry), following the reference's 'mixed' window sizing: level 0 keeps the number of
    windows of the top-level image, level 1 keeps the window size, and output/decoder blocks keep the window size
    of their level's first block."""
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"{levels} resolution levels (block strings); this reimplementation supports 1 to "
                         f"{MAX_LEVELS} (the released configurations use 2)")
    hw0 = tuple(int(s) for s in image_size)
    hw = [tuple(s // 2 ** i for s in hw0) for i in range(levels + 1)]
    win0, pat0 = _keep_num_windows(hw0, [s // w for s, w in zip(hw0, window)], [w // p for w, p in zip(window, patch)])
    sized = {0: (win0, pat0)}
    if levels > 1:
        sized[1] = _keep_window_size(hw[1], win0, pat0)
    out: dict[str, tuple[int, int, Geometry]] = {}

    def put(name, level, base):
        w, p = _keep_window_size(hw[level], *base)
        out[name] = (*hw[level], block_geometry(hw[level], w, p))

    if backbone == "hrnet":
        out["B00"] = (*hw0, block_geometry(hw0, win0, pat0))
        put("output_B0", 0, sized[0])
        if levels > 1:
            put("B01", 0, sized[0])
            out["B11"] = (*hw[1], block_geometry(hw[1], *sized[1]))
            put("output_B1", 1, sized[1])
    elif backbone == "unet":
        for i in range(levels):
            out[f"D{i}"] = (*hw[i], block_geometry(hw[i], *sized[i]))
        put("bridge", levels, sized[levels - 1])
        for i in range(levels - 1, -1, -1):
            put(f"U{i}", i, sized[max(i - 1, 0)])
    else:
        raise ValueError(f"unknown backbone {backbone!r}; use 'hrnet' or 'unet'")
    return out


# ----------------------------------------------------------------------------------------------- layers
class FrameConv(nn.Module):
    """Per-frame 2-D conv over (X, Y) of a (B, T, X, Y, C) tensor; odd kernel, stride 1, reflect padding (the
    reference's default). Kernel (k, k, in, out); PyTorch-default init."""

    features: int
    kernel: int = 3
    names: tuple[str, str] = ("conv_in", "conv_out")
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        b, nt, nx, ny, cin = x.shape
        k = self.kernel
        init = torch_conv_bias_init(cin * k * k)
        w = self.param("kernel", boxed(init, (None, None) + tuple(self.names)), (k, k, cin, self.features),
                       jnp.float32)
        x = x.astype(self.dtype)
        w = jnp.asarray(w, self.dtype)
        if k == 1:
            y = jnp.dot(x, w[0, 0])
        else:
            p = k // 2
            f = jnp.pad(x.reshape(b * nt, nx, ny, cin), ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
            f = conv2d(f, w, impl=self.conv)  # VALID; kernel gradient tuned on CPU (layers.conv2d)
            y = f.reshape(b, nt, nx, ny, self.features)
        if not self.use_bias:
            return y
        bias = self.param("bias", boxed(init, (self.names[1],)), (self.features,), jnp.float32)
        return y + jnp.asarray(bias, self.dtype)


class FrameNorm(nn.Module):
    """LayerNorm over (X, Y, C) of each frame with elementwise affine (X, Y, C); eps 1e-5, two-pass variance."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = x.shape[2:]
        scale = self.param("scale", boxed(ones, (None, None, None)), shape, jnp.float32)
        bias = self.param("bias", boxed(zeros, (None, None, None)), shape, jnp.float32)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(2, 3, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(2, 3, 4), keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def _unit(x):
    """x / max(||x||, 1e-12) over the last axis (cosine attention)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1e-12)


def _relative_position_index(grid: tuple[int, int]):
    """(N, N) index into a ((2 g0 - 1) (2 g1 - 1))-row table for the offsets between the N = g0 g1 grid cells."""
    r0, r1 = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
    r0, r1 = r0.reshape(-1), r1.reshape(-1)
    return (r0[:, None] - r0[None, :] + grid[0] - 1) * (2 * grid[1] - 1) + (r1[:, None] - r1[None, :] + grid[1] - 1)


class Attention(nn.Module):
    """Multi-head cosine attention over (B, T, X, Y, C): mode 'temporal', 'local' or 'global' (module docstring).

    `grid`: patches per window (local) or windows per axis (global); `patch`: patch size in pixels."""

    mode: str
    width: int
    heads: int
    grid: tuple[int, int] = (2, 2)
    patch: tuple[int, int] = (4, 4)
    position_bias: bool = True
    att_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla

    @nn.compact
    def __call__(self, x, train: bool = False):
        c, h = self.width, self.heads
        q, k, v = (FrameConv(c, 3, ("embed", "heads"), self.dtype, conv=self.conv, name=n)(x)
                   for n in ("query", "key", "value"))
        b, nt, nx, ny, _ = q.shape
        drop = nn.Dropout(self.att_dropout, deterministic=not train) if self.att_dropout > 0 else None

        def attend(qt, kt, vt, bias=None):  # (..., N, d) -> (..., N, d)
            att = jnp.einsum("...nd,...md->...nm", _unit(qt.astype(jnp.float32)), _unit(kt.astype(jnp.float32)))
            att = jax.nn.softmax(att, axis=-1)
            if bias is not None:  # the reference adds the bias after the softmax
                att = att + bias
            if drop is not None:
                att = drop(att)
            return jnp.einsum("...nm,...md->...nd", att.astype(vt.dtype), vt)

        if self.mode == "temporal":
            if c % h:
                raise ValueError(f"width {c} must be divisible by heads {h}")

            def tokens(a):  # (B, T, X, Y, C) -> (B, h, T, X*Y*C/h)
                a = a.reshape(b, nt, nx, ny, h, c // h).transpose(0, 4, 1, 2, 3, 5)
                return a.reshape(b, h, nt, nx * ny * (c // h))

            y = attend(tokens(q), tokens(k), tokens(v))
            y = y.reshape(b, h, nt, nx, ny, c // h).transpose(0, 2, 3, 4, 1, 5).reshape(b, nt, nx, ny, c)
        elif self.mode in ("local", "global"):
            px, py = self.patch
            if self.mode == "local":
                mx, my = self.grid
                gx, gy = nx // (mx * px), ny // (my * py)
            else:
                gx, gy = self.grid
                mx, my = nx // (gx * px), ny // (gy * py)
            if gx * mx * px != nx or gy * my * py != ny or min(gx, gy, mx, my) < 1:
                raise ValueError(f"{self.mode} attention: feature map {(nx, ny)} does not tile into grid {self.grid} "
                                 f"of patches {self.patch}")
            dim = px * py * c
            if dim % h:
                raise ValueError(f"patch features {dim} must be divisible by heads {h}")

            def split(a):  # -> (B, T, groups, h, tokens, d)
                a = a.reshape(b, nt, gx, mx, px, gy, my, py, c).transpose(0, 1, 2, 5, 3, 6, 4, 7, 8)
                if self.mode == "local":  # groups: windows; tokens: the patches of a window
                    a = a.reshape(b, nt, gx * gy, mx * my, h, dim // h)
                else:  # groups: patch positions; tokens: the windows
                    a = a.reshape(b, nt, gx, gy, mx, my, dim).transpose(0, 1, 4, 5, 2, 3, 6)
                    a = a.reshape(b, nt, mx * my, gx * gy, h, dim // h)
                return a.transpose(0, 1, 2, 4, 3, 5)

            bias = None
            if self.position_bias:
                tg = (mx, my) if self.mode == "local" else (gx, gy)
                table = self.param("relative_position_bias_table", boxed(normal_init(0.02), (None, "heads")),
                                   ((2 * tg[0] - 1) * (2 * tg[1] - 1), h), jnp.float32)
                bias = table[_relative_position_index(tg)].transpose(2, 0, 1)  # (h, N, N)
            y = attend(split(q), split(k), split(v), bias)  # (B, T, groups, h, tokens, d)
            y = y.transpose(0, 1, 2, 4, 3, 5)
            if self.mode == "local":
                y = y.reshape(b, nt, gx, gy, mx, my, px, py, c)
            else:
                y = y.reshape(b, nt, mx, my, gx, gy, px, py, c).transpose(0, 1, 4, 5, 2, 3, 6, 7, 8)
            y = y.transpose(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(b, nt, nx, ny, c)
        else:
            raise ValueError(f"unknown attention mode {self.mode!r}")
        return FrameConv(c, 3, ("heads", "embed"), self.dtype, conv=self.conv, name="output_proj")(y)


class Cell(nn.Module):
    """Pre-norm transformer cell (module docstring); `geometry` gives the L/G tiling of its block."""

    kind: str
    width: int
    heads: int
    geometry: Geometry
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    position_bias: bool = True
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.width
        x = grad_barrier(x)  # the residual stream's cotangent, materialised per cell (layers.grad_barrier)
        skip = x if x.shape[-1] == c else FrameConv(c, 3, ("conv_in", "embed"), self.dtype, conv=self.conv,
                                                       name="input_proj")(x)
        y = FrameNorm(dtype=self.dtype, name="norm1")(x)
        mode = _KINDS[self.kind]
        g = self.geometry
        grid, patch = (g.local_grid, g.local_patch) if mode == "local" else (g.global_grid, g.global_patch)
        y = Attention(mode, c, self.heads, grid, patch, self.position_bias and mode != "temporal", dtype=self.dtype,
                      conv=self.conv, name="attn")(y, train)
        x = skip.astype(self.dtype) + DropPath(self.drop_path)(y, not train)
        y = FrameNorm(dtype=self.dtype, name="norm2")(x)
        y = FrameConv(int(self.mixer_ratio * c), 3, ("embed", "mlp"), self.dtype, conv=self.conv, name="mixer_in")(y)
        slope = self.param("prelu", boxed(nn.initializers.constant(0.25), (None,)), (1,), jnp.float32)
        y = jnp.where(y >= 0, y, jnp.asarray(slope[0], y.dtype) * y)
        y = FrameConv(c, 3, ("mlp", "embed"), self.dtype, conv=self.conv, name="mixer_out")(y)
        return x + DropPath(self.drop_path)(y, not train)


class Block(nn.Module):
    """Cells given by a block string; the first cell maps the input width to `width`."""

    block_str: str
    width: int
    heads: int
    geometry: Geometry
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    remat: str = "none"
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla

    @nn.compact
    def __call__(self, x, train: bool = False):
        cell_cls = remat_wrap(Cell, self.remat, static_argnums=(2,))
        for i, kind in enumerate(parse_block_str(self.block_str)):
            x = cell_cls(kind, self.width, self.heads, self.geometry, self.mixer_ratio, self.drop_path,
                         dtype=self.dtype, conv=self.conv, name=f"cell_{i}")(x, train)
        return x


class Down(nn.Module):
    """Spatial /2^steps: each step a 2x2 space-to-depth (offsets (0,0), (1,0), (0,1), (1,1) in (x, y)) and a 1x1
    conv without bias; the first step maps to `features` channels."""

    features: int
    steps: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.steps):
            x = jnp.concatenate([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]],
                                axis=-1)
            x = FrameConv(self.features, 1, dtype=self.dtype, use_bias=False, name=f"D2_{i}")(x)
        return x


class Up(nn.Module):
    """Spatial x2^steps: each step a bilinear x2 resize (half-pixel centres) and a 3x3 conv (no bias) to `features`."""

    features: int
    steps: int = 1
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla

    @nn.compact
    def __call__(self, x):
        for i in range(self.steps):
            b, nt, nx, ny, c = x.shape
            x = jax.image.resize(x, (b, nt, 2 * nx, 2 * ny, c), "linear")
            x = FrameConv(self.features, 3, dtype=self.dtype, conv=self.conv, use_bias=False, name=f"U2_{i}")(x)
        return x


class _Backbone(nn.Module):
    block_str: tuple[str, ...]
    width: int
    heads: int
    window: tuple[int, int]
    patch: tuple[int, int]
    image_size: tuple[int, int]
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    remat: str = "none"
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla

    def _block(self, name, level, sizes, width=None, block_str=None):
        return Block(block_str or self.block_str[level], width or self.width * 2 ** level, self.heads,
                     sizes[name][2], self.mixer_ratio, self.drop_path, self.remat, self.dtype, conv=self.conv,
                     name=name)


class HRNet(_Backbone):
    """HRNet backbone, 1 or 2 levels (module docstring); output width * (2^levels - 1) channels at full size."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        levels = len(self.block_str)
        sizes = level_sizes(self.image_size, self.window, self.patch, levels, "hrnet")
        c, dt = self.width, self.dtype
        x00 = self._block("B00", 0, sizes)(x, train)
        if levels == 1:
            return self._block("output_B0", 0, sizes)(x00, train)
        x01 = self._block("B01", 0, sizes)(x00, train)
        x11 = self._block("B11", 1, sizes)(Down(2 * c, 1, dt, name="down_00_11")(x00), train)
        y0 = x01 + Up(c, 1, dt, conv=self.conv, name="up_1_0")(x11)
        y1 = x11 + Down(2 * c, 1, dt, name="down_0_1")(x01)
        y0 = self._block("output_B0", 0, sizes)(y0, train)
        y1 = self._block("output_B1", 1, sizes)(y1, train)
        return jnp.concatenate([y0, Up(2 * c, 1, dt, conv=self.conv, name="up_1")(y1)], axis=-1)


class UNet(_Backbone):
    """U-Net backbone, 1 or 2 levels, with the reference's gated skips (module docstring); output `width` channels."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        levels = len(self.block_str)
        sizes = level_sizes(self.image_size, self.window, self.patch, levels, "unet")
        c, dt = self.width, self.dtype
        skips = []
        for i in range(levels):
            x = self._block(f"D{i}", i, sizes)(x, train)
            skips.append(x)
            x = Down(x.shape[-1], 1, dt, name=f"down_{i}")(x)
        x = self._block("bridge", levels - 1, sizes, width=x.shape[-1], block_str=self.block_str[-1])(x, train)
        for i in range(levels - 1, -1, -1):
            ci = c * 2 ** i
            up = Up(ci, 1, dt, conv=self.conv, name=f"up_{i}")(x)
            skip = skips[i]
            gate = nn.relu(FrameConv(ci, 1, dtype=dt, use_bias=False, name=f"attention_{i}_conv_query")(up)
                           + FrameConv(ci, 1, dtype=dt, use_bias=False, name=f"attention_{i}_conv_x")(skip))
            gate = nn.sigmoid(FrameConv(1, 1, dtype=dt, use_bias=False, name=f"attention_{i}_conv_gate")(gate))
            x = jnp.concatenate([skip * gate, up], axis=-1)
            x = self._block(f"U{i}", i, sizes, width=c * 2 ** max(i - 1, 0))(x, train)
        return x


# ----------------------------------------------------------------------------------------------- tiling
def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, n) with at least `overlap` shared pixels (last tile flush
    with the end); [0] when n <= tile."""
    if n <= tile:
        return [0]
    step = max(tile - overlap, 1)
    starts = list(range(0, n - tile, step))
    return starts + [n - tile]


def _pad_to(x, tx: int, ty: int):
    px, py = max(tx - x.shape[1], 0), max(ty - x.shape[2], 0)
    if not (px or py):
        return x
    mode = "reflect" if px < x.shape[1] and py < x.shape[2] else "edge"
    return jnp.pad(x, ((0, 0), (0, px), (0, py), (0, 0), (0, 0)), mode=mode)


class DenoisingModel(nn.Module):
    """Stem conv (3 -> width), backbone, residual (stem added to the first `width` backbone channels), head conv to
    (real, imag). Input (B, X, Y, T, 3) = real, imag, g-map in SNR units, any X, Y (tiled to `image_size`);
    output (B, X, Y, T, 2) float32."""

    backbone: str = "hrnet"
    width: int = 64
    block_str: tuple[str, ...] = ("T1L1G1", "T1L1G1")
    heads: int = 64
    window: tuple[int, int] = (8, 8)
    patch: tuple[int, int] = (4, 4)
    image_size: tuple[int, int] = (64, 64)
    tile_overlap: tuple[int, int] | None = None
    mixer_ratio: float = 4.0
    drop_path: float = 0.1
    out_channels: int = 2
    dtype: Dtype = jnp.float32
    conv: str = "auto"  # 2-D conv lowering (layers.conv2d): auto | tuned | xla
    remat: str = "none"

    @nn.compact
    def __call__(self, image, train: bool = False):
        b, nx, ny, nt, _ = image.shape
        tx, ty = (int(v) for v in self.image_size)
        ox, oy = self.tile_overlap if self.tile_overlap is not None else (tx // 4, ty // 4)
        full = _pad_to(image, tx, ty)
        sx, sy = tile_starts(full.shape[1], tx, ox), tile_starts(full.shape[2], ty, oy)
        tiles = [full[:, i:i + tx, j:j + ty] for i in sx for j in sy]
        x = (tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=0)).astype(self.dtype)
        x = x.transpose(0, 3, 1, 2, 4)  # inside: (B, T, X, Y, C), so per-frame ops reshape (B*T) freely

        stem = FrameConv(self.width, 3, ("conv_in", "embed"), self.dtype, conv=self.conv, name="pre")(x)
        cls = {"hrnet": HRNet, "unet": UNet}.get(self.backbone)
        if cls is None:
            raise ValueError(f"unknown backbone {self.backbone!r}; use 'hrnet' or 'unet'")
        y = cls(tuple(self.block_str), self.width, self.heads, tuple(self.window), tuple(self.patch), (tx, ty),
                self.mixer_ratio, self.drop_path, self.remat, self.dtype, conv=self.conv, name="backbone")(stem, train)
        y = jnp.concatenate([y[..., : self.width] + stem, y[..., self.width:]], axis=-1)
        out = FrameConv(self.out_channels, 3, ("embed", "conv_out"), self.dtype, conv=self.conv, name="post")(y)
        out = out.astype(jnp.float32).transpose(0, 2, 3, 1, 4)

        if len(tiles) > 1:  # average the overlapping tiles back into the (padded) frame
            parts = out.reshape(len(tiles), b, tx, ty, nt, self.out_channels)
            acc = jnp.zeros((b, full.shape[1], full.shape[2], nt, self.out_channels), jnp.float32)
            cnt = jnp.zeros((1, full.shape[1], full.shape[2], 1, 1), jnp.float32)
            for n, (i, j) in enumerate((i, j) for i in sx for j in sy):
                acc = acc.at[:, i:i + tx, j:j + ty].add(parts[n])
                cnt = cnt.at[:, i:i + tx, j:j + ty].add(1.0)
            out = acc / cnt
        return out[:, :nx, :ny]


def make_model(size: str = "small", backbone: str = "hrnet", dtype: Dtype = jnp.float32, remat: str = "none",
               **overrides) -> DenoisingModel:
    """A DenoisingModel of a named size ('tiny', 'small', 'medium', 'large'), fields overridable."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {sorted(SIZES)}")
    kw = dict(SIZES[size])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["block_str"] = tuple(kw["block_str"])
    for k in ("window", "patch", "image_size"):
        kw[k] = tuple(int(v) for v in kw[k])
    if kw.get("tile_overlap") is not None:
        kw["tile_overlap"] = tuple(int(v) for v in kw["tile_overlap"])
    return DenoisingModel(backbone=backbone, dtype=dtype, remat=remat, **kw)


def num_params(model: DenoisingModel) -> int:
    """Parameter count of `model` (shape-only init, no compute)."""
    x = jnp.zeros((1, *model.image_size, 2, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
