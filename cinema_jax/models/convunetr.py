"""ConvUNetR segmentation (and landmark-heatmap) model on the CineMA encoder, SAX 3D and LAX 2D (Flax Linen).

Why UNETR-like with additive skips: the pretrained stem gives 1/4 and 1/8 features, the ViT gives 1/16 tokens; an
extra strided conv makes a 1/32 level; residual conv adapters (ConvResBlock) bring each level to the decoder width
and a transposed-conv decoder adds them back level by level (no concatenation), as in the reference. z is never
down/up-sampled when the factors are (.., .., 1). The 1/2 level has no skip; the full-resolution skip is a
ConvResBlock on the raw image.

    logits = model.apply({'params': p}, images, train=False, rngs={'dropout': k, 'droppath': k})
    images {view: (B, X, Y, Z, C) | (B, X, Y, C)} -> {view: (B, X, Y[, Z], out_chans)} float32
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.conv_stem import CONV_NORM_EPS
from cinema_jax.models.encoder import MultiViewEncoder, per_view, split_views
from cinema_jax.models.layers import PatchConvTranspose, conv, gelu, layer_norm, remat_wrap

Dtype = Any
Array = jax.Array


def unetr_levels(enc_patch: Sequence[int], enc_scale: Sequence[int], n_conv: int, dec_depth: int,
                 dec_patch: Sequence[int], dec_scale: Sequence[int]) -> tuple[int, int]:
    """(decoder levels without skip below the first stem stage, number of extra downsampling convs)."""
    if n_conv >= dec_depth:
        raise ValueError(f"{n_conv} stem stages need more than {dec_depth} decoder levels")
    enc_patch, enc_scale = tuple(enc_patch), tuple(enc_scale)
    enc_factor = enc_patch
    for _ in range(n_conv):
        enc_factor = tuple(a * b for a, b in zip(enc_factor, enc_scale))
    factor = tuple(dec_patch)
    no_skip = n_down = None
    for i in range(dec_depth):
        if factor == enc_patch:
            no_skip = i
        if factor == enc_factor:
            n_down = dec_depth - 1 - i
        factor = tuple(a * b for a, b in zip(factor, dec_scale))
    if no_skip is None or n_down is None:
        raise ValueError(f"decoder patch {tuple(dec_patch)} x scale {tuple(dec_scale)} cannot reach the encoder "
                         f"factors {enc_patch} and {enc_factor}")
    return no_skip, n_down


class ConvResBlock(nn.Module):
    """Pre-activation residual block: LN -> GELU -> conv -> LN -> GELU -> dropout -> conv, + 1x1 shortcut."""

    features: int
    kernel: int = 3
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        nd = x.ndim - 2
        cin = x.shape[-1]
        h = gelu(layer_norm(CONV_NORM_EPS, self.dtype, name="norm1")(x))
        h = conv(self.features, (self.kernel,) * nd, cin, self.dtype, name="conv1", impl=self.conv_impl)(h)
        h = gelu(layer_norm(CONV_NORM_EPS, self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train, rng_collection="dropout")(h)
        h = conv(self.features, (self.kernel,) * nd, self.features, self.dtype, name="conv2", impl=self.conv_impl)(h)
        if cin != self.features:
            x = conv(self.features, (1,) * nd, cin, self.dtype, name="shortcut")(x)
        return h + x.astype(h.dtype)


def res_block_class(remat: bool):
    """ConvResBlock, recomputed in backward when `remat` (only its input is kept). Under remat='full' this covers
    the decoder's full-resolution blocks, whose activations dominate a segmentation step's memory."""
    return remat_wrap(ConvResBlock, "full" if remat else "none", static_argnums=(2,))  # (self, x, train)


class DecoderBlock(nn.Module):
    """Transposed conv (k = s) up, + skip, `n_blocks` ConvResBlocks."""

    features: int
    up_kernel: tuple[int, ...]
    n_blocks: int = 2
    kernel: int = 3
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, train: bool = False) -> Array:
        x = PatchConvTranspose(self.features, self.up_kernel, self.dtype, name="up")(x)
        if skip is not None:
            x = x + skip.astype(x.dtype)
        block_cls = res_block_class(self.remat)
        for j in range(self.n_blocks):
            x = block_cls(self.features, self.kernel, 0.0, self.dtype, self.conv_impl, name=f"conv_{j}")(x, train)
        return x


class UpsampleDecoder(nn.Module):
    chans: tuple[int, ...]
    patch_size: tuple[int, ...]
    scale_factor: tuple[int, ...]
    kernel: int = 3
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, embeddings: list[Array | None], train: bool = False) -> Array:
        embeddings = list(embeddings)
        x = embeddings.pop()
        n = len(self.chans)
        for i, ch in enumerate(self.chans[::-1]):
            last = i == n - 1
            out = ch if last else self.chans[-i - 2]
            x = DecoderBlock(out, tuple(self.patch_size if last else self.scale_factor), 2, self.kernel, self.dtype,
                             self.remat, self.conv_impl, name=f"blocks_{i}")(x, embeddings.pop(), train)
        return x


class ConvUNetR(MultiViewEncoder):
    """Multi-view ConvUNetR: the shared encoder without fusion (`encoder.MultiViewEncoder`) + a UNETR decoder per
    view. `dec_patch_size` / `dec_scale_factor`: 3-tuples (LAX uses 2) or per-view mappings."""

    out_chans: int = 4
    dec_chans: tuple[int, ...] = (32, 64, 128, 256, 512)
    dec_patch_size: Any = (2, 2, 1)
    dec_scale_factor: Any = (2, 2, 1)
    dec_kernel_size: int = 3
    dropout: float = 0.0

    def decoder_geometry(self, view: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(decoder patch size, decoder scale factor) of a view."""
        nd = len(self.view_geometry(view)[0])
        return per_view(self.dec_patch_size, view, nd), per_view(self.dec_scale_factor, view, nd)

    def levels(self) -> tuple[int, int]:
        found = {unetr_levels(*self.view_geometry(v)[1:], len(self.conv_chans), len(self.dec_chans),
                              *self.decoder_geometry(v)) for v in self.views}
        if len(found) != 1:
            raise ValueError(f"all views must give the same decoder level layout, got {sorted(found)}")
        return found.pop()

    def setup(self):
        no_skip, n_down = self.levels()
        chans = tuple(self.dec_chans)
        heavy = self.remat == "full"  # the conv stem and every conv block of the decoder are recomputed too
        res_block = res_block_class(heavy)
        self.setup_encoder(fusion=False)
        image_blocks, downs, adapters, decoders, heads = {}, {}, {}, {}, {}
        for v in self.views:
            dp, ds = self.decoder_geometry(v)
            image_blocks[v] = res_block(chans[0], self.dec_kernel_size, self.dropout, self.dtype, self.conv_impl)
            downs[v] = [conv(self.enc_embed_dim, ds, self.enc_embed_dim, self.dtype, strides=ds, padding="VALID")
                        for _ in range(n_down)]
            outs = [chans[no_skip + i] for i in range(len(self.conv_chans))]
            outs += [chans[no_skip + len(self.conv_chans) + i] for i in range(n_down + 1)]
            adapters[v] = [res_block(o, self.dec_kernel_size, self.dropout, self.dtype, self.conv_impl) for o in outs]
            decoders[v] = UpsampleDecoder(chans, dp, ds, self.dec_kernel_size, self.dtype, heavy, self.conv_impl)
            heads[v] = conv(self.out_chans, (1,) * len(dp), chans[0], self.dtype)
        self.dec_image_conv_block = image_blocks
        self.dec_down_blocks = downs
        self.dec_conv_blocks = adapters
        self.decoder = decoders
        self.pred_head = heads

    def __call__(self, images: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        views = self.input_views(images)
        no_skip, _ = self.levels()
        skips, x, grids = self.encode(images, views, train)
        out = {}
        for v, tokens in split_views(x, {v: math.prod(g) for v, g in grids.items()}):
            level = tokens.reshape((x.shape[0],) + grids[v] + (x.shape[-1],))
            feats = list(skips[v]) + [level]
            for down in self.dec_down_blocks[v]:
                level = down(level)
                feats.append(level)
            emb: list[Array | None] = [self.dec_image_conv_block[v](images[v].astype(self.dtype), train)]
            emb += [None] * no_skip
            emb += [blk(f, train) for blk, f in zip(self.dec_conv_blocks[v], feats)]
            y = self.decoder[v](emb, train)
            out[v] = self.pred_head[v](y).astype(jnp.float32)
        return out
