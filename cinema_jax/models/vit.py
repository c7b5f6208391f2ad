"""Shared ViT encoder (CLS + pre-norm blocks + final LayerNorm) and CrossMAE decoder, Flax Linen.

Why one shared encoder for all views: CineMA fuses views by concatenating their tokens (no view embedding; each view
has its own stem and grid positional embedding) and lets one transformer attend across them. The MAE decoder is
CrossMAE-style: queries (decoder CLS + mask tokens) cross-attend to the visible tokens, which stay constant and are
not re-normalised across layers, so masked queries never attend to each other.

Sizes follow the reference's `get_vit_config` (tiny/base/large/huge); "base" is used everywhere in the paper.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinema_jax.models.layers import block_class, boxed, layer_norm, normal_init

Dtype = Any
Array = jax.Array

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(enc_embed_dim=16, enc_depth=1, enc_n_heads=2, dec_embed_dim=16, dec_depth=1, dec_n_heads=2),
    "base": dict(enc_embed_dim=768, enc_depth=12, enc_n_heads=12, dec_embed_dim=512, dec_depth=8, dec_n_heads=16),
    "large": dict(enc_embed_dim=1024, enc_depth=24, enc_n_heads=16, dec_embed_dim=512, dec_depth=8, dec_n_heads=16),
    "huge": dict(enc_embed_dim=1280, enc_depth=32, enc_n_heads=16, dec_embed_dim=512, dec_depth=8, dec_n_heads=16),
}


def vit_size(size: str) -> dict[str, int]:
    if size not in SIZES:
        raise ValueError(f"model size must be one of {sorted(SIZES)}, got {size!r}")
    return dict(SIZES[size])


def token_init(key, shape, dtype=jnp.float32):
    """Learned tokens (cls, mask): N(0, 0.02) like the reference."""
    return normal_init(0.02)(key, shape, dtype)


class ViTEncoder(nn.Module):
    """Prepends a learned CLS token, runs `depth` blocks, final LayerNorm: (B, N, D) -> (B, 1 + N, D)."""

    embed_dim: int
    depth: int
    n_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cls = self.param("cls_token", boxed(token_init, (None, None, "embed")), (1, 1, self.embed_dim), jnp.float32)
        cls = jnp.broadcast_to(jnp.asarray(cls, x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x.astype(self.dtype)], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        blk = block_class(self.remat)
        for i in range(self.depth):
            x = blk(self.n_heads, self.mlp_ratio, self.qkv_bias, self.norm_eps, self.drop_path, self.dtype,
                    self.attention_impl, name=f"blocks_{i}")(x, None, not train)
        return layer_norm(self.norm_eps, self.dtype, name="norm")(x)


class ViTDecoder(nn.Module):
    """Cross-attention decoder: queries attend to fixed keys; returns LN of the last `n_out` query tokens."""

    embed_dim: int
    depth: int
    n_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, q: Array, kv: Array | None, n_out: int, train: bool = False) -> Array:
        blk = block_class(self.remat)
        for i in range(self.depth):
            q = blk(self.n_heads, self.mlp_ratio, self.qkv_bias, self.norm_eps, self.drop_path, self.dtype,
                    self.attention_impl, name=f"blocks_{i}")(q, kv, not train)
        q = q[:, q.shape[1] - n_out:]
        return layer_norm(self.norm_eps, self.dtype, name="norm")(q)
