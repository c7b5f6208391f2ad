"""CineMA models in Flax Linen (channel-last) and factories from a model config.

Why Linen (docs/design.md): models are pure functions of a `params` pytree, so weight conversion, logical-axis
sharding, Orbax checkpoints, encoder surgery and layer-wise lr decay are plain pytree operations.

Model config (a dict or an ml_collections ConfigDict, `config.model` in the task configs); every key is optional:
    views            list of views, default ['sax', 'lax_2c', 'lax_3c', 'lax_4c'] (MAE) / ['sax'] (fine-tune)
    image_size       {view: size}; else `sax_size` (default [192, 192, 16]) and `lax_size` (default [256, 256])
    size             'tiny' | 'base' | 'large' | 'huge' (default 'base'); explicit enc_embed_dim, enc_depth,
                     enc_n_heads, dec_embed_dim, dec_depth, dec_n_heads override the table
    patch_size [4,4,1], scale_factor [2,2,1], conv_chans [64,128], conv_n_blocks 2, mlp_ratio 4, norm_eps 1e-5
    MAE:        mask_ratio 0.75, norm_target False
    ConvViT:    out_chans (required), reduce 'all' | 'patch' | 'cls', drop_path
    ConvUNetR:  out_chans 4, dec_chans [32,64,128,256,512], dec_patch_size [2,2,1], dec_scale_factor [2,2,1],
                dropout, drop_path
Run-time options are keyword arguments: dtype (compute dtype; params stay float32), remat
('none'|'block'|'dots'|'full'), attention_impl (None / 'explicit' = `layers.attention`'s head-major form, 'xla' or
'cudnn' = `jax.nn.dot_product_attention`), conv_impl ('auto'|'tuned'|'xla', `layers.resolve_conv_impl`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from cinema_jax.models.convunetr import ConvUNetR
from cinema_jax.models.convvit import ConvViT
from cinema_jax.models.landmark import heatmap_soft_argmax, landmark_heatmaps
from cinema_jax.models.layers import check_conv_impl
from cinema_jax.models.mae import VIEWS, CineMA
from cinema_jax.models.patchify import patchify, random_mask, reconstruct, unpatchify
from cinema_jax.models.pos_embed import sincos_pos_embed
from cinema_jax.models.transfer import layer_decay_groups, load_encoder
from cinema_jax.models.vit import SIZES, vit_size

DEFAULT_SAX_SIZE = (192, 192, 16)
DEFAULT_LAX_SIZE = (256, 256)

__all__ = [
    "SIZES",
    "VIEWS",
    "CineMA",
    "ConvUNetR",
    "ConvViT",
    "build_convunetr",
    "build_convvit",
    "build_mae",
    "build_model",
    "heatmap_soft_argmax",
    "landmark_heatmaps",
    "layer_decay_groups",
    "load_encoder",
    "patchify",
    "random_mask",
    "reconstruct",
    "sincos_pos_embed",
    "unpatchify",
    "vit_size",
]


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _tuple(v) -> Any:
    if isinstance(v, Mapping):
        return tuple((str(k), tuple(int(a) for a in x)) for k, x in v.items())
    return tuple(int(a) for a in v)


def _dtype(dtype: Any):
    if dtype in (None, "float32", "fp32"):
        return jnp.float32
    if dtype in ("bfloat16", "bf16"):
        return jnp.bfloat16
    if dtype in ("float16", "fp16"):
        return jnp.float16
    return dtype


def _common(cfg: dict, default_views: tuple[str, ...]) -> dict:
    views = cfg.get("views", default_views)
    views = (views,) if isinstance(views, str) else tuple(views)
    sizes = cfg.get("image_size")
    if sizes is None:
        sax = tuple(cfg.get("sax_size", DEFAULT_SAX_SIZE))
        lax = tuple(cfg.get("lax_size", DEFAULT_LAX_SIZE))
        sizes = {v: (sax if v == "sax" else lax) for v in views}
    sizes = {str(k): v for k, v in dict(sizes).items()}
    missing = [v for v in views if v not in sizes]
    if missing:
        raise ValueError(f"model.image_size has no entry for views {missing}")
    vit = vit_size(cfg.get("size", "base"))
    for k in list(vit):
        if cfg.get(k) is not None:
            vit[k] = int(cfg[k])
    return dict(
        image_sizes=tuple((v, tuple(int(a) for a in sizes[v])) for v in views),
        patch_size=_tuple(cfg.get("patch_size", (4, 4, 1))),
        scale_factor=_tuple(cfg.get("scale_factor", (2, 2, 1))),
        conv_chans=tuple(int(c) for c in cfg.get("conv_chans", (64, 128))),
        conv_n_blocks=int(cfg.get("conv_n_blocks", 2)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
    ), vit


def _runtime(dtype, remat, attention_impl, conv_impl) -> dict:
    return dict(dtype=_dtype(dtype), remat=remat or "none", attention_impl=attention_impl,
                conv_impl=check_conv_impl(conv_impl))  # a bad name fails at build time, not at the first trace


def build_mae(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
              attention_impl: str | None = None, conv_impl: str = "auto") -> CineMA:
    cfg = _plain(model_cfg)
    common, vit = _common(cfg, VIEWS)
    return CineMA(**common, **vit, norm_target=bool(cfg.get("norm_target", False)),
                  mask_ratio=float(cfg.get("mask_ratio", 0.75)), drop_path=float(cfg.get("drop_path", 0.0)),
                  **_runtime(dtype, remat, attention_impl, conv_impl))


def build_convvit(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
                  attention_impl: str | None = None, conv_impl: str = "auto") -> ConvViT:
    cfg = _plain(model_cfg)
    common, vit = _common(cfg, ("sax",))
    enc = {k: v for k, v in vit.items() if k.startswith("enc_")}
    if cfg.get("out_chans") is None:
        raise ValueError("model.out_chans is required for a ConvViT")
    return ConvViT(**common, **enc, out_chans=int(cfg["out_chans"]), reduce=str(cfg.get("reduce", "all")),
                   drop_path=float(cfg.get("drop_path", 0.0)), **_runtime(dtype, remat, attention_impl, conv_impl))


def build_convunetr(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
                    attention_impl: str | None = None, conv_impl: str = "auto") -> ConvUNetR:
    cfg = _plain(model_cfg)
    common, vit = _common(cfg, ("sax",))
    enc = {k: v for k, v in vit.items() if k.startswith("enc_")}
    return ConvUNetR(**common, **enc, out_chans=int(cfg.get("out_chans", 4)),
                     dec_chans=tuple(int(c) for c in cfg.get("dec_chans", (32, 64, 128, 256, 512))),
                     dec_patch_size=_tuple(cfg.get("dec_patch_size", (2, 2, 1))),
                     dec_scale_factor=_tuple(cfg.get("dec_scale_factor", (2, 2, 1))),
                     dropout=float(cfg.get("dropout", 0.0)), drop_path=float(cfg.get("drop_path", 0.0)),
                     **_runtime(dtype, remat, attention_impl, conv_impl))


BUILDERS = {"mae": build_mae, "convvit": build_convvit, "convunetr": build_convunetr}


def build_model(kind: str, model_cfg: Any = None, **runtime) -> Any:
    """`kind` in {'mae', 'convvit', 'convunetr'}."""
    if kind not in BUILDERS:
        raise ValueError(f"model kind must be one of {sorted(BUILDERS)}, got {kind!r}")
    return BUILDERS[kind](model_cfg, **runtime)
