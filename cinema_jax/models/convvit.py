"""ConvViT classifier / regressor / landmark-coordinate model on the CineMA encoder (Flax Linen).

Why: the fine-tuning tasks that predict one vector per study reuse the MAE encoder unchanged — per-view ConvMAE
stems, the shared ViT with CLS, per-view MultiScaleFusion — so pretrained weights transfer by path
(`transfer.load_encoder`). ED and ES frames are stacked as input channels (n_frames = 2 -> C = 2).

Heads: one Linear(embed -> out) per view and one for CLS. `reduce`:
  'all'   (default) mean over {head_view(mean of the view's fused tokens)} + {head_cls(CLS)};
  'patch' mean over the views only;  'cls' the CLS head only.

    logits = model.apply({'params': p}, images, train=False)           # (B, out_chans) float32
    feats = model.apply({'params': p}, images, method=ConvViT.features)  # {'cls': (B,1,D), view: (B,N,D)}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.conv_stem import DownsampleEncoder, MultiScaleFusion, effective_patch
from cinema_jax.models.layers import dense
from cinema_jax.models.mae import as_view_dict, per_view
from cinema_jax.models.patchify import grid_size
from cinema_jax.models.vit import ViTEncoder

Dtype = Any
Array = jax.Array
REDUCTIONS = ("all", "patch", "cls")


class ConvViT(nn.Module):
    """Multi-view ConvViT. `image_sizes`: {view: configured size} (dict or (view, size) pairs)."""

    image_sizes: Any
    out_chans: int
    patch_size: Any = (4, 4, 1)
    scale_factor: Any = (2, 2, 1)
    conv_chans: tuple[int, ...] = (64, 128)
    conv_n_blocks: int = 2
    enc_embed_dim: int = 768
    enc_depth: int = 12
    enc_n_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    reduce: str = "all"
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    conv_impl: str = "auto"

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(as_view_dict(self.image_sizes))

    def view_geometry(self, view: str):
        size = tuple(int(s) for s in as_view_dict(self.image_sizes)[view])
        nd = len(size)
        return size, per_view(self.patch_size, view, nd), per_view(self.scale_factor, view, nd)

    def setup(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        stems, fusions = {}, {}
        for v in self.views:
            size, p, s = self.view_geometry(v)
            stems[v] = DownsampleEncoder(size, p, s, tuple(self.conv_chans), self.conv_n_blocks, self.enc_embed_dim,
                                         self.dtype, self.remat == "full", self.conv_impl)
            fusions[v] = MultiScaleFusion(self.enc_embed_dim, self.norm_eps, self.dtype)
        self.enc_down = stems
        self.enc_fusion = fusions
        self.encoder = ViTEncoder(self.enc_embed_dim, self.enc_depth, self.enc_n_heads, self.mlp_ratio, self.qkv_bias,
                                  self.norm_eps, self.drop_path, self.dtype, self.remat, self.attention_impl)
        self.pred_head = {k: dense(self.out_chans, ("embed", None), self.dtype) for k in (*self.views, "cls")}

    def _input_views(self, images: Mapping[str, Array]) -> list[str]:
        unknown = [v for v in images if v not in self.views]
        if unknown:
            raise ValueError(f"views {unknown} are not configured (model views: {list(self.views)})")
        views = [v for v in self.views if v in images]
        if not views:
            raise ValueError("no input views given")
        return views

    def features(self, images: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        views = self._input_views(images)
        skips, xs, grids = {}, [], {}
        for v in views:
            _, p, s = self.view_geometry(v)
            grids[v] = grid_size(images[v].shape[1:-1], effective_patch(p, s, len(self.conv_chans)))
            skips[v], x = self.enc_down[v](images[v], None)
            xs.append(x)
        x = self.encoder(jnp.concatenate(xs, axis=1), train)
        out = {"cls": x[:, :1]}
        start = 1
        for v in views:
            n = math.prod(grids[v])
            out[v] = self.enc_fusion[v](skips[v], x[:, start:start + n], grids[v], None)
            start += n
        return out

    def __call__(self, images: Mapping[str, Array], train: bool = False) -> Array:
        feats = self.features(images, train)
        views = [v for v in self.views if v in images]
        logits = []
        if self.reduce in ("all", "patch"):
            logits += [self.pred_head[v](feats[v].mean(axis=1)) for v in views]
        if self.reduce in ("all", "cls"):
            logits.append(self.pred_head["cls"](feats["cls"][:, 0]))
        if self.is_initializing():  # every head exists in params whatever `reduce` is (reference state dict)
            for k in (*views, "cls"):
                self.pred_head[k](feats["cls"][:, 0])
        return jnp.mean(jnp.stack(logits, axis=1), axis=1).astype(jnp.float32)
