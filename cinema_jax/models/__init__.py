"""CineMA models in Flax Linen (channel-last) and factories from a model config.

Why Linen (docs/design.md): models are pure functions of a `params` pytree, so weight conversion, logical-axis
sharding, Orbax checkpoints, encoder surgery and layer-wise lr decay are plain pytree operations.

Model config (a dict or an ml_collections ConfigDict, `config.model` in the task configs). Every key is optional: a
factory passes on only the keys a config gives (and that the model has), merged over the `size` table
(big_vision's `{**decode_variant(variant), **kw}`), so every default is the model class's own field default:
    views            list of views, default `data.phantom.VIEWS` (MAE) / ['sax'] (fine-tune)
    image_size       {view: size}; else `sax_size` and `lax_size`; else `encoder.DEFAULT_IMAGE_SIZE` (192x192x16,
                     256x256)
    size             'tiny' | 'base' | 'large' | 'huge' (`vit.SIZES`; the field defaults are 'base'); explicit
                     enc_embed_dim, enc_depth, enc_n_heads, dec_embed_dim, dec_depth, dec_n_heads override the table
    encoder (`encoder.MultiViewEncoder`): patch_size [4,4,1], scale_factor [2,2,1], conv_chans [64,128],
                     conv_n_blocks 2, mlp_ratio 4, qkv_bias True, norm_eps 1e-5, drop_path 0
    MAE:        mask_ratio 0.75, norm_target False
    ConvViT:    out_chans (required), reduce 'all' | 'patch' | 'cls'
    ConvUNetR:  out_chans 4, dec_chans [32,64,128,256,512], dec_patch_size [2,2,1], dec_scale_factor [2,2,1],
                dec_kernel_size 3, dropout 0
Run-time options are keyword arguments: dtype (compute dtype; params stay float32), remat
('none'|'block'|'dots'|'full'), attention_impl (None / 'explicit' = `layers.attention`'s head-major form, 'xla' or
'cudnn' = `jax.nn.dot_product_attention`), conv_impl ('auto'|'tuned'|'xla', `layers.resolve_conv_impl`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from cinema_jax.config import to_plain
from cinema_jax.data.phantom import VIEWS
from cinema_jax.models.convunetr import ConvUNetR
from cinema_jax.models.convvit import ConvViT
from cinema_jax.models.encoder import DEFAULT_IMAGE_SIZE, default_image_size
from cinema_jax.models.landmark import heatmap_soft_argmax, landmark_heatmaps
from cinema_jax.models.layers import check_conv_impl
from cinema_jax.models.mae import CineMA
from cinema_jax.models.patchify import patchify, random_mask, reconstruct, unpatchify
from cinema_jax.models.pos_embed import sincos_pos_embed
from cinema_jax.models.transfer import layer_decay_groups, load_encoder
from cinema_jax.models.vit import SIZES, vit_size

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "SIZES",
    "VIEWS",
    "CineMA",
    "ConvUNetR",
    "ConvViT",
    "build_convunetr",
    "build_convvit",
    "build_mae",
    "build_model",
    "default_image_size",
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

RUNTIME_FIELDS = ("dtype", "remat", "attention_impl", "conv_impl")  # keyword arguments of the factories, not config


def _tuple(v) -> Any:
    if isinstance(v, Mapping):
        return tuple((str(k), tuple(int(a) for a in x)) for k, x in v.items())
    return tuple(int(a) for a in v)


def _like(field: dataclasses.Field, value: Any) -> Any:
    """A config value in the type of the model field it sets: the default's type (tuples hashable, as Linen fields
    want), else the annotation's (a required field)."""
    default = field.default
    for kind in (bool, int, float, str):  # bool first: it is an int
        if isinstance(default, kind) or (default is dataclasses.MISSING and field.type == kind.__name__):
            return kind(value)
    return _tuple(value) if isinstance(default, tuple) else value


def _dtype(dtype: Any):
    if dtype in (None, "float32", "fp32"):
        return jnp.float32
    if dtype in ("bfloat16", "bf16"):
        return jnp.bfloat16
    if dtype in ("float16", "fp16"):
        return jnp.float16
    return dtype


def _image_sizes(cfg: dict, default_views: tuple[str, ...]) -> tuple:
    """((view, size), ...) in the configured view order: model.image_size, else sax_size / lax_size, else defaults."""
    views = cfg.get("views")
    views = default_views if views is None else (views,) if isinstance(views, str) else tuple(views)
    sizes = cfg.get("image_size")
    if sizes is None:
        sizes = {v: cfg.get("sax_size" if v == "sax" else "lax_size") or default_image_size(v) for v in views}
    missing = [v for v in views if v not in sizes]
    if missing:
        raise ValueError(f"model.image_size has no entry for views {missing}")
    return tuple((v, tuple(int(a) for a in sizes[v])) for v in views)


def _build(cls: type, model_cfg: Any, default_views: tuple[str, ...], dtype: Any, remat: str | None,
           attention_impl: str | None, conv_impl: str | None) -> Any:
    """`cls` from the keys `model_cfg` gives over the `size` table; the class's field defaults fill the rest."""
    cfg = to_plain(model_cfg) if model_cfg is not None else {}
    if not isinstance(cfg, dict):
        raise TypeError(f"model config must be a mapping, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name", "image_sizes",
                                                                             *RUNTIME_FIELDS)}
    image_sizes = _image_sizes(cfg, default_views)
    given = vit_size(cfg["size"]) if cfg.get("size") is not None else {}
    required = [k for k, f in fields.items() if f.default is dataclasses.MISSING and cfg.get(k) is None]
    if required:
        raise ValueError(f"model.{required[0]} is required for a {cls.__name__}")
    given.update({k: cfg[k] for k in fields if cfg.get(k) is not None})
    kw = {k: _like(fields[k], v) for k, v in given.items() if k in fields}  # fine-tune models: no dec_* ViT keys
    return cls(image_sizes=image_sizes, **kw, dtype=_dtype(dtype), remat=remat or "none",
               attention_impl=attention_impl,
               conv_impl=check_conv_impl(conv_impl))  # a bad name fails at build time, not at the first trace


def build_mae(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
              attention_impl: str | None = None, conv_impl: str = "auto") -> CineMA:
    return _build(CineMA, model_cfg, VIEWS, dtype, remat, attention_impl, conv_impl)


def build_convvit(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
                  attention_impl: str | None = None, conv_impl: str = "auto") -> ConvViT:
    return _build(ConvViT, model_cfg, ("sax",), dtype, remat, attention_impl, conv_impl)


def build_convunetr(model_cfg: Any = None, dtype: Any = None, remat: str = "none",
                    attention_impl: str | None = None, conv_impl: str = "auto") -> ConvUNetR:
    return _build(ConvUNetR, model_cfg, ("sax",), dtype, remat, attention_impl, conv_impl)


BUILDERS = {"mae": build_mae, "convvit": build_convvit, "convunetr": build_convunetr}


def build_model(kind: str, model_cfg: Any = None, **runtime) -> Any:
    """`kind` in {'mae', 'convvit', 'convunetr'}."""
    if kind not in BUILDERS:
        raise ValueError(f"model kind must be one of {sorted(BUILDERS)}, got {kind!r}")
    return BUILDERS[kind](model_cfg, **runtime)
