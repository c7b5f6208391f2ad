"""ConvMAE-style per-view stem ("DownsampleEncoder") and multi-scale fusion (Flax Linen, channel-last).

Why a conv stem before the ViT: CineMA follows ConvMAE — strided conv stages with depth-wise "masked conv blocks"
give local high-resolution features that are (a) kept as skips for segmentation decoders and (b) fused back into the
ViT tokens, while the ViT only sees 16x16(x1) patches. In MAE pretraining the masked conv blocks multiply by the
visible map (upsampled from the ViT grid) right before the depth-wise conv, so masked patches cannot leak into
visible ones; the residual path itself is untouched (reference semantics).

Layout per view: SAX (B, X, Y, Z, C), LAX (B, X, Y, C). Stage i: Conv(k = s = patch_i) -> LayerNorm(1e-6) -> GELU,
then `n_blocks` MaskedConvBlocks. After the stages: patchify by the last scale factor, Linear(prod(p)*C -> embed),
an extra Linear(embed -> embed), + fixed sin-cos positional embedding (interpolated when the grid differs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.layers import conv, dense, gelu, layer_norm, remat_wrap
from cinema_jax.models.patchify import grid_size, patchify, upsample_mask
from cinema_jax.models.pos_embed import pos_embed_for_grid

Dtype = Any
Array = jax.Array
CONV_NORM_EPS = 1e-6


def stage_patch_sizes(patch_size: Sequence[int], scale_factor: Sequence[int], n_conv: int) -> list[tuple[int, ...]]:
    """[first stage patch, scale for each further stage..., scale of the final patch embedding]."""
    return [tuple(patch_size)] + [tuple(scale_factor)] * n_conv


def effective_patch(patch_size: Sequence[int], scale_factor: Sequence[int], n_conv: int) -> tuple[int, ...]:
    eff = (1,) * len(patch_size)
    for p in stage_patch_sizes(patch_size, scale_factor, n_conv):
        eff = tuple(a * b for a, b in zip(eff, p))
    return eff


class ConvNormAct(nn.Module):
    """Strided conv (kernel = stride) -> channel LayerNorm -> GELU."""

    features: int
    kernel: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = conv(self.features, self.kernel, x.shape[-1], self.dtype, strides=self.kernel, padding="VALID",
                 name="conv")(x)
        x = layer_norm(CONV_NORM_EPS, self.dtype, name="norm")(x)
        return gelu(x)


class ConvMlp(nn.Module):
    """1x1 conv MLP: fc1 (c -> ratio c), GELU, fc2 (ratio c -> c)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        nd = x.ndim - 2
        c = x.shape[-1]
        x = conv(self.hidden, (1,) * nd, c, self.dtype, name="fc1")(x)
        x = gelu(x)
        return conv(c, (1,) * nd, self.hidden, self.dtype, name="fc2")(x)


class MaskedConvBlock(nn.Module):
    """x += conv2(dwconv5(visible * conv1(LN(x)))); x += MLP(LN(x))."""

    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, visible: Array | None = None) -> Array:
        nd = x.ndim - 2
        c = x.shape[-1]
        h = layer_norm(CONV_NORM_EPS, self.dtype, name="norm1")(x)
        h = conv(c, (1,) * nd, c, self.dtype, name="conv1")(h)
        if visible is not None:
            h = h * visible[..., None].astype(h.dtype)
        h = conv(c, (5,) * nd, c, self.dtype, groups=c, name="dw_conv", impl=self.conv_impl)(h)
        h = conv(c, (1,) * nd, c, self.dtype, name="conv2")(h)
        x = x + h
        h = layer_norm(CONV_NORM_EPS, self.dtype, name="norm2")(x)
        return x + ConvMlp(c * self.mlp_ratio, self.dtype, name="mlp")(h)


class ConvStage(nn.Module):
    """One stem stage: `patch_embed` (ConvNormAct) then `conv_{j}` MaskedConvBlocks."""

    features: int
    kernel: tuple[int, ...]
    n_blocks: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, visible: Array | None) -> Array:
        x = ConvNormAct(self.features, self.kernel, self.dtype, name="patch_embed")(x)
        block_cls = remat_wrap(MaskedConvBlock, "full" if self.remat else "none", static_argnums=())
        for j in range(self.n_blocks):
            x = block_cls(dtype=self.dtype, conv_impl=self.conv_impl, name=f"conv_{j}")(x, visible)
        return x


class PatchEmbed(nn.Module):
    """Patchify (x, y, z, c order) + Linear, equivalent to a strided conv; param `proj`."""

    patch: tuple[int, ...]
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return dense(self.embed_dim, (None, "embed"), self.dtype, name="proj")(patchify(x, self.patch))


class DownsampleEncoder(nn.Module):
    """Per-view conv stem: returns (skips per stage, tokens (B, N, embed) with pos-embed added)."""

    image_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    scale_factor: tuple[int, ...]
    conv_chans: tuple[int, ...]
    conv_n_blocks: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"  # layers.resolve_conv_impl

    @property
    def eff_patch(self) -> tuple[int, ...]:
        return effective_patch(self.patch_size, self.scale_factor, len(self.conv_chans))

    @property
    def config_grid(self) -> tuple[int, ...]:
        return grid_size(self.image_size, self.eff_patch)

    @nn.compact
    def __call__(self, image: Array, visible: Array | None = None) -> tuple[list[Array], Array]:
        """image (B, *spatial, C); visible (B, *grid) bool (True = visible) or None (no masking)."""
        spatial = image.shape[1:-1]
        if len(spatial) != len(self.image_size):
            raise ValueError(f"expected {len(self.image_size)} spatial dims, got image of shape {image.shape}")
        sizes = stage_patch_sizes(self.patch_size, self.scale_factor, len(self.conv_chans))
        grid = grid_size(spatial, self.eff_patch)
        stage_vis: list[Array | None] = [None] * len(self.conv_chans)
        if visible is not None:
            visible = visible.reshape((image.shape[0],) + grid)
            for i in range(len(self.conv_chans)):
                factor = (1,) * len(grid)
                for p in sizes[i + 1:]:
                    factor = tuple(a * b for a, b in zip(factor, p))
                stage_vis[i] = upsample_mask(visible, factor)
        x = image.astype(self.dtype)
        skips = []
        for i, ch in enumerate(self.conv_chans):
            x = ConvStage(ch, sizes[i], self.conv_n_blocks, self.dtype, self.remat, self.conv_impl,
                          name=f"conv_blocks_{i}")(
                x, stage_vis[i])
            skips.append(x)
        x = PatchEmbed(sizes[-1], self.embed_dim, self.dtype, name="patch_embed")(x)
        x = dense(self.embed_dim, ("embed", None), self.dtype, name="linear")(x)
        pe = pos_embed_for_grid(self.embed_dim, self.config_grid, grid)
        return skips, x + jnp.asarray(pe, x.dtype)[None]


class MultiScaleFusion(nn.Module):
    """Adds stride-conv projections of the stem skips to a view's encoder tokens, then LayerNorm.

    `visible_idx` (B, n_keep) selects the visible token positions (MAE); None = all tokens.
    """

    embed_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, skips: Sequence[Array], x: Array, grid: Sequence[int],
                 visible_idx: Array | None = None) -> Array:
        for i, skip in enumerate(skips):
            kernel = tuple(s // g for s, g in zip(skip.shape[1:-1], grid))
            down = conv(self.embed_dim, kernel, skip.shape[-1], self.dtype, strides=kernel, padding="VALID",
                        name=f"down_convs_{i}")(skip)
            down = down.reshape(down.shape[0], math.prod(grid), self.embed_dim)
            if visible_idx is not None:
                down = jnp.take_along_axis(down, visible_idx[..., None], axis=1)
            x = x + down
        return layer_norm(self.norm_eps, self.dtype, name="norm")(x)
