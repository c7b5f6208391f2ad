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

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cinema_jax.models.encoder import MultiViewEncoder
from cinema_jax.models.layers import dense

Array = jax.Array
REDUCTIONS = ("all", "patch", "cls")


class ConvViT(MultiViewEncoder):
    """Multi-view ConvViT: the shared encoder (`encoder.MultiViewEncoder`) + linear heads. `out_chans` is required
    (keyword only)."""

    out_chans: int = dataclasses.field(kw_only=True)
    reduce: str = "all"

    def setup(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        self.setup_encoder()
        self.pred_head = {k: dense(self.out_chans, ("embed", None), self.dtype) for k in (*self.views, "cls")}

    def features(self, images: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        views = self.input_views(images)
        return self.fuse(*self.encode(images, views, train))

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
