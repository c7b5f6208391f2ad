"""CineMA multi-view masked autoencoder (Flax Linen), reference-exact.

Why this structure (../shared/docs/cinema.md §1): every view (sax 3D, lax_2c/3c/4c 2D) has its own ConvMAE stem;
the visible tokens of all views are concatenated behind one CLS token into a shared ViT encoder; each view's stem
skips are fused back into its encoder tokens (MultiScaleFusion); a CrossMAE decoder lets [decoder CLS, per-view mask
tokens + pos] cross-attend to the visible tokens; per-view linear heads predict the masked 16x16(x1) pixel patches
and the loss is the MSE on masked patches, averaged per view and then over views (raw [0, 1] targets by default).

Masking is per view and per sample with static shapes (n_keep = int(N * (1 - ratio)) visible tokens per row), so the
whole step jits. Masks are either sampled from the 'mask' rng stream or injected (`mask={view: bool (B, N)}`, True =
masked) — e.g. to reproduce the reference fixtures.

Call contract (the train loop relies on it):
    out = model.apply({'params': p}, images, mask=None, train=True, rngs={'mask': k1, 'droppath': k2})
    images: {view: (B, X, Y, Z, C) for sax | (B, X, Y, C) for lax_*}, any non-empty subset of the configured views
    out['loss']      scalar float32
    out['pred']      {view: (B, n_masked, prod(patch) * C)} float32, masked patches in increasing patch order
    out['mask']      {view: (B, N) bool} True = masked
    out['target']    {view: (B, N, prod(patch) * C)} float32 (patchified input; normalised if norm_target)
    out['metrics']   {f'{view}_mse_loss', f'{view}_target_mean', f'{view}_target_std', 'loss'} float32 scalars
    model.apply(..., images, method=CineMA.features) -> {'cls': (B, 1, D), view: (B, N, D)} (no masking)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cinema_jax.models.encoder import MultiViewEncoder, split_views
from cinema_jax.models.layers import boxed, dense, xavier_uniform, zeros
from cinema_jax.models.patchify import gather_tokens, grid_size, mask_indices, n_keep_for, patchify, random_mask
from cinema_jax.models.pos_embed import pos_embed_for_grid
from cinema_jax.models.vit import ViTDecoder, token_init

Dtype = Any
Array = jax.Array


def static_n_keep(mask: Array, ratio: float) -> int:
    """Visible tokens per row: counted from a concrete mask, else from the ratio (under jit)."""
    n = mask.shape[1]
    try:
        arr = np.asarray(mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return n_keep_for(n, ratio)
    counts = (~arr.astype(bool)).sum(axis=1)
    if counts.size and not (counts == counts[0]).all():
        raise ValueError(f"every mask row must keep the same number of tokens, got {sorted(set(counts.tolist()))}")
    return int(counts[0]) if counts.size else n_keep_for(n, ratio)


def masked_mse(target: Array, pred: Array, masked_idx: Array, norm_target: bool,
               eps: float = 1e-6) -> tuple[Array, dict[str, Array]]:
    """MSE on masked patches; metrics as the reference (per-patch mean/unbiased std averaged over all patches)."""
    target = target.astype(jnp.float32)
    mean = target.mean(axis=-1, keepdims=True)
    p = target.shape[-1]
    var = ((target - mean) ** 2).sum(axis=-1, keepdims=True) / max(p - 1, 1) if p > 1 else jnp.full_like(mean, jnp.nan)
    std = jnp.sqrt(var)
    metrics = {"target_mean": mean.mean(), "target_std": std.mean()}
    if norm_target:
        target = (target - mean) / (std + eps)
    tm = gather_tokens(target, masked_idx)
    loss = jnp.mean((pred.astype(jnp.float32) - jax.lax.stop_gradient(tm)) ** 2)
    metrics["mse_loss"] = loss
    return loss, metrics


class MaskToken(nn.Module):
    """Per-view decoder embedding: a learned `mask_token` (pos-embeds are fixed constants)."""

    dim: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("mask_token", boxed(token_init, (None, None, "embed")), (1, 1, self.dim), jnp.float32)


class CineMA(MultiViewEncoder):
    """Multi-view ConvViT MAE: the shared encoder (`encoder.MultiViewEncoder`) + a CrossMAE decoder.

    Input channels are inferred from the images (the prediction heads output prod(patch) * C pixels).
    """

    dec_embed_dim: int = 512
    dec_depth: int = 8
    dec_n_heads: int = 16
    norm_target: bool = False
    mask_ratio: float = 0.75

    def dec_patch(self, view: str) -> tuple[int, ...]:
        """Pixels per predicted patch: the encoder's token patch."""
        return self.token_patch(view)

    def setup(self):
        self.setup_encoder()
        self.dec_linear = dense(self.dec_embed_dim, ("embed", None), self.dtype)
        self.dec_embed = {v: MaskToken(self.dec_embed_dim) for v in self.views}
        self.decoder = ViTDecoder(self.dec_embed_dim, self.dec_depth, self.dec_n_heads, self.mlp_ratio, self.qkv_bias,
                                  self.norm_eps, self.drop_path, self.dtype, self.remat, self.attention_impl)
        # output width depends on the input channels: created lazily through `_head`
        self.pred_head = {v: _LazyHead(self.dtype) for v in self.views}

    def features(self, images: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        """Mask-free encoder features after fusion (reference `feature_forward`)."""
        views = self.input_views(images)
        return self.fuse(*self.encode(images, views, train))

    def __call__(self, images: Mapping[str, Array], mask: Mapping[str, Array] | None = None,
                 train: bool = False) -> dict[str, Any]:
        views = self.input_views(images)
        batch = images[views[0]].shape[0]
        masks, vis_idx, msk_idx, grids = {}, {}, {}, {}
        mask_key = None
        for v in views:
            grids[v] = self.token_grid(v, images[v])
            n = math.prod(grids[v])
            if mask is not None and v in mask:
                m = jnp.asarray(mask[v]).astype(bool).reshape(batch, n)
                n_keep = static_n_keep(mask[v], self.mask_ratio)
            else:
                if mask_key is None:
                    mask_key = self.make_rng("mask")
                m = random_mask(jax.random.fold_in(mask_key, self.views.index(v)), batch, n, self.mask_ratio)
                n_keep = n_keep_for(n, self.mask_ratio)
            masks[v] = m
            vis_idx[v], msk_idx[v] = mask_indices(m, n_keep)

        # stems (masked conv blocks see only visible regions), the visible tokens of every view through the ViT,
        # fusion of the stem skips at visible positions, then projection to the decoder width
        skips, x, _ = self.encode(images, views, train, masks, vis_idx)
        x = self.dec_linear(jnp.concatenate(list(self.fuse(skips, x, grids, vis_idx).values()), axis=1))

        # decoder inputs: visible tokens + pos (keys), [cls, mask token + pos] (queries)
        keys, queries = [], [x[:, :1]]
        for v, tokens in split_views(x, {v: vis_idx[v].shape[1] for v in views}):
            pe = jnp.asarray(pos_embed_for_grid(self.dec_embed_dim, self._config_grid(v), grids[v]), x.dtype)
            pe = jnp.broadcast_to(pe[None], (batch,) + pe.shape)
            keys.append(tokens + gather_tokens(pe, vis_idx[v]))
            token = jnp.asarray(self.dec_embed[v](), x.dtype)
            queries.append(token + gather_tokens(pe, msk_idx[v]))
        n_masked = [msk_idx[v].shape[1] for v in views]
        y = self.decoder(jnp.concatenate(queries, axis=1), jnp.concatenate(keys, axis=1), sum(n_masked), train)

        preds, targets, metrics, losses = {}, {}, {}, []
        start = 0
        for v, nm in zip(views, n_masked):
            patch = self.dec_patch(v)
            target = patchify(images[v], patch)
            pred = self.pred_head[v](y[:, start:start + nm], target.shape[-1]).astype(jnp.float32)
            start += nm
            loss_v, met = masked_mse(target, pred, msk_idx[v], self.norm_target)
            preds[v] = pred
            targets[v] = target.astype(jnp.float32)
            metrics.update({f"{v}_{k}": val for k, val in met.items()})
            if nm > 0:  # a view with nothing masked has no loss (NaN in the reference, skipped there too)
                losses.append(loss_v)
        loss = sum(losses) / len(losses) if losses else jnp.asarray(jnp.nan, jnp.float32)
        metrics["loss"] = loss
        return {"loss": loss, "pred": preds, "mask": masks, "target": targets, "metrics": metrics}

    def _config_grid(self, view: str) -> tuple[int, ...]:
        return grid_size(self.view_geometry(view)[0], self.dec_patch(view))


class _LazyHead(nn.Module):
    """Per-view prediction head Linear(dec_embed -> prod(patch) * C), width fixed at first call."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, features: int) -> Array:
        kernel = self.param("kernel", boxed(xavier_uniform, ("embed", None)), (x.shape[-1], features), jnp.float32)
        bias = self.param("bias", boxed(zeros, (None,)), (features,), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.dot(x, jnp.asarray(kernel, self.dtype)) + jnp.asarray(bias, self.dtype)
