"""Encoder transfer from an MAE params tree into fine-tune models, and layer ids for layer-wise lr decay.

Why by path: Linen params are plain nested dicts whose top-level names mirror the reference modules
(`enc_down_<view>` stems, `enc_fusion_<view>` fusion, `encoder` shared ViT, everything else task-specific), so
restoring a pretrained encoder is a subtree copy: decoder, mask tokens and MAE heads are simply not copied, fixed
pos-embeds are not params (recomputed for the new image size), views the target lacks are dropped, and the first
stem conv kernel is repeated over extra input channels (ED+ES frames, multi-sequence input) like the reference's
`repeat` (not rescaled).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cinema_jax.errors import CheckpointError

ENCODER_TOP = re.compile(r"^(encoder|enc_down_.+|enc_fusion_.+)$")
FIRST_CONV = ("conv_blocks_0", "patch_embed", "conv", "kernel")


def _strip(tree: Any) -> Any:
    if isinstance(tree, dict) and set(tree) == {"params"}:
        return tree["params"]
    if hasattr(tree, "keys") and set(tree.keys()) == {"params"}:
        return tree["params"]
    return tree


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def is_encoder_path(path: tuple[str, ...]) -> bool:
    return bool(path) and bool(ENCODER_TOP.match(path[0]))


def load_encoder(pretrained_params: Any, target_params: Any) -> Any:
    """Copy the encoder subtrees of `pretrained_params` into `target_params` (same structure/boxing as target)."""
    src = flatten_dict(nn.meta.unbox(_strip(pretrained_params)))
    wrapped = isinstance(target_params, dict) and set(target_params) == {"params"}
    tgt = flatten_dict(_strip(target_params), is_leaf=lambda _, x: _is_box(x))
    tops = {p[0] for p in tgt if is_encoder_path(p)}
    missing_tops = sorted(t for t in tops if not any(p[0] == t for p in src))
    if missing_tops:
        raise CheckpointError(f"pretrained params have no {', '.join(missing_tops)} (views or encoder missing)")
    out = {}
    for path, leaf in tgt.items():
        if not is_encoder_path(path):
            out[path] = leaf
            continue
        name = "/".join(path)
        if path not in src:
            raise CheckpointError(f"pretrained params lack {name}")
        value = np.asarray(src[path])
        target = leaf.unbox() if _is_box(leaf) else leaf
        shape = tuple(target.shape)
        if path[1:] == FIRST_CONV and value.shape != shape and value.shape[:-2] == shape[:-2] \
                and value.shape[-1] == shape[-1] and shape[-2] % value.shape[-2] == 0:
            value = np.tile(value, (1,) * (value.ndim - 2) + (shape[-2] // value.shape[-2], 1))
        if value.shape != shape:
            raise CheckpointError(f"shape mismatch for {name}: pretrained {value.shape} vs model {shape}")
        value = value.astype(target.dtype)
        out[path] = leaf.replace_boxed(value) if _is_box(leaf) else value
    extra = sorted("/".join(p) for p in src if p[0] in tops and p not in tgt)
    if extra:
        raise CheckpointError(f"pretrained encoder has parameters the model lacks: {extra[0]} (+{len(extra) - 1})")
    params = unflatten_dict(out)
    return {"params": params} if wrapped else params


def layer_decay_groups(params: Any) -> Any:
    """Pytree (same structure as the unboxed params) of int layer ids for layer-wise lr decay.

    0: stems / fusion (`enc_*`), CLS token, patch embeddings; k + 1: `encoder/blocks_k`; n_blocks + 1: everything
    else (encoder final norm, decoders, heads) — the BEiT/MAE grouping of the reference (scale decay**(n+1-id)).
    """
    flat = flatten_dict(nn.meta.unbox(_strip(params)))
    n_blocks = len({p[1] for p in flat if p[0] == "encoder" and len(p) > 1 and p[1].startswith("blocks_")})
    ids = {}
    for path in flat:
        if path[0].startswith("enc_") or "cls_token" in path or "patch_embed" in path or "pos_embed" in path:
            ids[path] = 0
        elif path[0] == "encoder" and len(path) > 1 and path[1].startswith("blocks_"):
            ids[path] = int(path[1].split("_")[1]) + 1
        else:
            ids[path] = n_blocks + 1
    return unflatten_dict(ids)
