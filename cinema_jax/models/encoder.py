"""The CineMA multi-view encoder, written once for the MAE (`mae.CineMA`) and the fine-tune models (`convvit.ConvViT`,
`convunetr.ConvUNetR`).

Why one base class: the three models share the encoder the pretrained weights belong to — a ConvMAE stem per view
(`enc_down_<view>`), the views' tokens concatenated behind one CLS token into a shared ViT (`encoder`), and a
per-view MultiScaleFusion of the stem skips into the view's tokens (`enc_fusion_<view>`; ConvUNetR has none, its
decoder takes the skips instead). `MultiViewEncoder` holds the encoder's fields and defaults, creates those
submodules under exactly these names (they mirror the reference's state dict: `convert.py` maps names by string
rules and `transfer.load_encoder` copies the subtrees by path) and runs stems -> ViT -> fusion; each model adds its
own fields, heads and decoder.

Image sizes: `image_sizes` is {view: size} (a dict or (view, size) pairs, the order is the token order); the model
factories fill it from `DEFAULT_IMAGE_SIZE`, CineMA's input grids, where a config gives none.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.conv_stem import DownsampleEncoder, MultiScaleFusion, effective_patch
from cinema_jax.models.patchify import gather_tokens, grid_size
from cinema_jax.models.vit import ViTEncoder

Dtype = Any
Array = jax.Array

# CineMA's input grids (x, y[, z]): the one table of default image sizes, keyed like `model.sax_size` / `lax_size`
DEFAULT_IMAGE_SIZE: dict[str, tuple[int, ...]] = {"sax": (192, 192, 16), "lax": (256, 256)}


def default_image_size(view: str) -> tuple[int, ...]:
    """CineMA's input size of a view: SAX 3-D, every LAX view 2-D."""
    return DEFAULT_IMAGE_SIZE["sax" if view == "sax" else "lax"]


def as_view_dict(value) -> dict:
    """Accept a mapping or a tuple of (key, value) pairs (hashable form for Linen fields)."""
    if isinstance(value, Mapping):
        return dict(value)
    return {k: v for k, v in value}


def per_view(value, view: str, ndim: int) -> tuple[int, ...]:
    """A per-view tuple from either a mapping/pairs (per view) or one 3D tuple truncated to the view's dims."""
    if isinstance(value, Mapping) or (isinstance(value, tuple) and value and isinstance(value[0], tuple)
                                      and len(value[0]) == 2 and isinstance(value[0][0], str)):
        value = as_view_dict(value)[view]
    out = tuple(int(v) for v in value)
    if len(out) < ndim:
        raise ValueError(f"{view}: size {out} has fewer than {ndim} dims")
    return out[:ndim]


def split_views(x: Array, counts: Mapping[str, int]) -> Iterator[tuple[str, Array]]:
    """(view, its tokens) from a (B, 1 + sum(counts), D) sequence whose first token is the CLS token."""
    start = 1
    for view, n in counts.items():
        yield view, x[:, start:start + n]
        start += n


class MultiViewEncoder(nn.Module):
    """Per-view conv stems -> shared ViT (CLS first) -> per-view fusion; the base of the CineMA models.

    `patch_size` / `scale_factor`: 3-tuples (LAX views use the first two entries) or per-view mappings. Subclasses
    call `setup_encoder` in their `setup` and `encode` (+ `fuse`) in their forward passes.
    """

    image_sizes: Any
    # the conv stems
    patch_size: Any = (4, 4, 1)
    scale_factor: Any = (2, 2, 1)
    conv_chans: tuple[int, ...] = (64, 128)
    conv_n_blocks: int = 2
    conv_impl: str = "auto"  # layers.resolve_conv_impl
    # the shared ViT (defaults: vit.SIZES['base'])
    enc_embed_dim: int = 768
    enc_depth: int = 12
    enc_n_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5  # also the fusion's LayerNorms
    drop_path: float = 0.0
    attention_impl: str | None = None  # layers.attention
    # compute dtype (params stay float32) and recomputation in backward ('full': the conv stems too)
    dtype: Dtype = jnp.float32
    remat: str = "none"

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(as_view_dict(self.image_sizes))

    def view_geometry(self, view: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(configured image size, first patch size, scale factor) of a view."""
        size = tuple(int(s) for s in as_view_dict(self.image_sizes)[view])
        nd = len(size)
        return size, per_view(self.patch_size, view, nd), per_view(self.scale_factor, view, nd)

    def token_patch(self, view: str) -> tuple[int, ...]:
        """Pixels per encoder token of a view (first patch x scale factor per stem stage)."""
        _, p, s = self.view_geometry(view)
        return effective_patch(p, s, len(self.conv_chans))

    def token_grid(self, view: str, image: Array) -> tuple[int, ...]:
        """The token grid of an input image (B, X, Y[, Z], C), which may differ from the configured size."""
        return grid_size(image.shape[1:-1], self.token_patch(view))

    def input_views(self, images: Mapping[str, Array]) -> list[str]:
        """The configured views present in `images`, in token order; a ValueError for unknown or no views."""
        unknown = [v for v in images if v not in self.views]
        if unknown:
            raise ValueError(f"views {unknown} are not configured (model views: {list(self.views)})")
        views = [v for v in self.views if v in images]
        if not views:
            raise ValueError("no input views given")
        return views

    def setup_encoder(self, fusion: bool = True) -> None:
        """Create `enc_down_<view>`, `enc_fusion_<view>` (when `fusion`) and `encoder`; call from `setup`."""
        heavy = self.remat == "full"  # the conv stems are recomputed in backward too
        self.enc_down = {v: DownsampleEncoder(*self.view_geometry(v), tuple(self.conv_chans), self.conv_n_blocks,
                                              self.enc_embed_dim, self.dtype, heavy, self.conv_impl)
                         for v in self.views}
        if fusion:
            self.enc_fusion = {v: MultiScaleFusion(self.enc_embed_dim, self.norm_eps, self.dtype) for v in self.views}
        self.encoder = ViTEncoder(self.enc_embed_dim, self.enc_depth, self.enc_n_heads, self.mlp_ratio, self.qkv_bias,
                                  self.norm_eps, self.drop_path, self.dtype, self.remat, self.attention_impl)

    def encode(self, images: Mapping[str, Array], views: list[str], train: bool,
               masks: Mapping[str, Array] | None = None, keep: Mapping[str, Array] | None = None
               ) -> tuple[dict[str, list[Array]], Array, dict[str, tuple[int, ...]]]:
        """-> (stem skips {view: [...]}, ViT output (B, 1 + N, D) CLS first, token grids {view: grid}).

        MAE masking: `masks` {view: (B, n) bool, True = masked} hides the masked regions from the stems' masked
        conv blocks and `keep` {view: (B, k) int} picks the visible tokens that enter the ViT."""
        skips, xs, grids = {}, [], {}
        for v in views:
            grids[v] = self.token_grid(v, images[v])
            visible = None if masks is None else (~masks[v]).reshape(images[v].shape[:1] + grids[v])
            skips[v], x = self.enc_down[v](images[v], visible)
            xs.append(x if keep is None else gather_tokens(x, keep[v]))
        return skips, self.encoder(jnp.concatenate(xs, axis=1), train), grids

    def fuse(self, skips: Mapping[str, list[Array]], x: Array, grids: Mapping[str, tuple[int, ...]],
             keep: Mapping[str, Array] | None = None) -> dict[str, Array]:
        """{'cls': (B, 1, D), view: (B, n, D) the view's tokens with its stem skips fused in}, in token order;
        `keep` as in `encode` (the tokens are then the visible ones)."""
        counts = {v: math.prod(g) if keep is None else keep[v].shape[1] for v, g in grids.items()}
        out = {"cls": x[:, :1]}
        for v, tokens in split_views(x, counts):
            out[v] = self.enc_fusion[v](skips[v], tokens, grids[v], None if keep is None else keep[v])
        return out
