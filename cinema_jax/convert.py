"""Reference PyTorch CineMA state dicts <-> our Flax params, the fixture contract, and `cinema-jax convert`.

Why a name-mapping converter (not a checkpoint loader of torch objects): our Linen param paths mirror the reference
module names one to one, so a state dict converts by string rules plus layout transposes, and torch is not needed:
  `<m>_dict.<view>.`  <-> `<m>_<view>/`      (per-view ModuleDicts; `pred_head_dict.cls` -> `pred_head_cls`)
  `.<i>.`             <-> `_<i>`             (ModuleLists: `encoder.blocks.3` -> `encoder/blocks_3`)
  Linear weight (out, in)                -> kernel (in, out)
  Conv weight (out, in, k...)            -> kernel (k..., in, out)     (depth-wise: (c, 1, k...) -> (k..., 1, c))
  ConvTranspose weight (in, out, k...)   -> kernel (k..., in, out)     (modules named `up`)
  LayerNorm weight                       -> scale
Fixed sin-cos `pos_embed` tensors are not params here (recomputed); import checks their shapes, export regenerates
them so an export reproduces the reference state dict keys and values.

Inputs are channel-first in the reference and channel-last here; `upstream_fixture_outputs` transposes both ways.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cinema_jax.config import get, to_plain
from cinema_jax.data.phantom import VIEWS
from cinema_jax.errors import CheckpointError, CinemaError, ConfigError

DICT_MODULES = ("enc_down", "enc_fusion", "dec_embed", "pred_head", "dec_conv_blocks", "dec_down_blocks",
                "dec_image_conv_block", "decoder")
KINDS = ("mae", "convvit", "convunetr")
# tasks whose checkpoints hold a CineMA model (the export writes the reference's names for those only)
CINEMA_TASKS = ("pretrain_mae", "segment", "classify", "regress", "landmark")
_VIEW_RE = r"(sax|lax_2c|lax_3c|lax_4c|cls)"
_DICT_RE = re.compile(rf"^({'|'.join(DICT_MODULES)})_{_VIEW_RE}(?:_(\d+))?$")
_LIST_RE = re.compile(r"^(.*\D)_(\d+)$")


# ----------------------------------------------------------------------------------------------- name mapping
def ref_key_to_path(key: str) -> tuple[str, ...] | None:
    """Reference key -> our param path (None for the fixed `pos_embed` buffers)."""
    tokens = key.split(".")
    if tokens[-1] == "pos_embed":
        return None
    out: list[str] = []
    i = 0
    body, leaf = tokens[:-1], tokens[-1]
    while i < len(body):
        t = body[i]
        if t.endswith("_dict") and i + 1 < len(body):
            out.append(f"{t[:-5]}_{body[i + 1]}")
            i += 2
        elif t.isdigit():
            if not out:
                raise CheckpointError(f"cannot map reference key {key}")
            out[-1] = f"{out[-1]}_{t}"
            i += 1
        else:
            out.append(t)
            i += 1
    return tuple(out) + (leaf,)


def path_to_ref_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path[:-1]:
        m = _DICT_RE.match(p)
        if m:
            parts += [f"{m.group(1)}_dict", m.group(2)] + ([m.group(3)] if m.group(3) else [])
            continue
        m = _LIST_RE.match(p)
        parts += [m.group(1), m.group(2)] if m else [p]
    leaf = path[-1]
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(parts + [leaf])


def _is_transposed(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] == "up"


def ref_value_to_param(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Map a reference 'weight' leaf to kernel/scale with the layout change; other leaves unchanged."""
    value = np.asarray(value)
    if path[-1] != "weight":
        return path, value
    if value.ndim == 1:
        return path[:-1] + ("scale",), value
    if value.ndim == 2:
        return path[:-1] + ("kernel",), value.T
    nd = value.ndim - 2
    if _is_transposed(path):
        perm = tuple(range(2, 2 + nd)) + (0, 1)
    else:
        perm = tuple(range(2, 2 + nd)) + (1, 0)
    return path[:-1] + ("kernel",), np.transpose(value, perm)


def param_to_ref_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if path[-1] != "kernel":
        return value
    if value.ndim == 2:
        return value.T
    nd = value.ndim - 2
    if _is_transposed(path):
        perm = (nd, nd + 1) + tuple(range(nd))
    else:
        perm = (nd + 1, nd) + tuple(range(nd))
    return np.transpose(value, perm)


def state_dict_to_params(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (nested params dict of numpy arrays, {key: value} of the skipped pos_embed buffers)."""
    from flax.traverse_util import unflatten_dict

    flat, pos = {}, {}
    for key, value in state_dict.items():
        path = ref_key_to_path(key)
        if path is None:
            pos[key] = np.asarray(value)
            continue
        path, v = ref_value_to_param(path, value)
        flat[path] = np.ascontiguousarray(v.astype(np.float32))
    return unflatten_dict(flat), pos


def params_to_state_dict(params: Any, model: Any = None) -> dict[str, np.ndarray]:
    """Our params -> reference state dict (float32, channel-first layouts); with `model`, pos_embeds are added."""
    import flax.linen as nn
    from flax.traverse_util import flatten_dict

    from cinema_jax.models.transfer import _strip

    flat = flatten_dict(nn.meta.unbox(_strip(params)))
    out = {path_to_ref_key(p): np.ascontiguousarray(param_to_ref_value(p, np.asarray(v, np.float32)))
           for p, v in flat.items()}
    if model is not None:
        out.update(pos_embed_buffers(model, {p[0] for p in flat}))
    return out


def pos_embed_buffers(model: Any, tops: set[str]) -> dict[str, np.ndarray]:
    from cinema_jax.models.conv_stem import effective_patch
    from cinema_jax.models.patchify import grid_size
    from cinema_jax.models.pos_embed import sincos_pos_embed

    out = {}
    for v in model.views:
        geo = model.view_geometry(v)
        size, p, s = geo[0], geo[1], geo[2]
        grid = grid_size(size, effective_patch(p, s, len(model.conv_chans)))
        if f"enc_down_{v}" in tops:
            out[f"enc_down_dict.{v}.pos_embed"] = sincos_pos_embed(model.enc_embed_dim, grid)[None].copy()
        if f"dec_embed_{v}" in tops:
            out[f"dec_embed_dict.{v}.pos_embed"] = sincos_pos_embed(model.dec_embed_dim, grid)[None].copy()
    return out


# ----------------------------------------------------------------------------------------------- files
def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a reference state dict from `.safetensors` or a torch zip checkpoint (`.pt`/`.pth`/`.ckpt`, read by
    `cinema_jax.torchfile`: torch is never imported and nothing pickled is run, so torch.load's weights_only bypass,
    CVE-2025-32434, cannot apply). Tensors keep their dtype; `import_state_dict` checks them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state dict not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if path.suffix in (".pt", ".pth", ".ckpt"):
        from cinema_jax.torchfile import read_state_dict

        return read_state_dict(path)
    raise CheckpointError(f"unsupported state dict format {path.suffix!r} (use .safetensors or .pt): {path}")


# integer bookkeeping buffers that are not weights (BatchNorm's step counter): never checked as weights
BOOKKEEPING = ("num_batches_tracked",)
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def is_float(value: Any) -> bool:
    """Floating point, bfloat16 included (ml_dtypes' bfloat16 is not an np.floating subtype)."""
    return np.asarray(value).dtype.name in _FLOATS


def check_weight(value: Any, key: str, source: str) -> None:
    """A weight must be floating point and finite: an integer / bool tensor where a weight belongs is a mislabelled
    or corrupt file (casting would hide it), and a NaN/Inf weight gives a model that outputs NaN."""
    value = np.asarray(value)
    if not is_float(value):
        raise CheckpointError(f"{source}: {key} has dtype {value.dtype}, weights must be floating point")
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    if bad:
        raise CheckpointError(f"{source}: {key} holds {bad} NaN/Inf values (of {value.size})")


def save_state_dict(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    from cinema_jax.fileutil import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp))


# ----------------------------------------------------------------------------------------------- model config
def _views_in(state_dict: Mapping[str, Any]) -> list[str]:
    found = []
    for k in state_dict:
        m = re.match(r"^enc_down_dict\.([^.]+)\.", k)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    order = ["sax", "lax_2c", "lax_3c", "lax_4c"]
    return sorted(found, key=lambda v: order.index(v) if v in order else len(order))


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...] | None:
    return tuple(sd[key].shape) if key in sd else None


def infer_model_config(state_dict: Mapping[str, np.ndarray], kind: str, meta: Mapping | None = None,
                       size: str | None = None, image_size: Mapping[str, Any] | None = None) -> dict:
    """Model config (see cinema_jax.models) from a reference state dict, plus meta.json / size table / defaults."""
    from cinema_jax.models import default_image_size
    from cinema_jax.models.vit import SIZES

    if kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r} (expected one of {', '.join(KINDS)})")
    meta = dict(meta or {})
    sd = state_dict
    views = _views_in(sd)
    if not views:
        raise CheckpointError("state dict has no enc_down_dict.<view> stem: not a CineMA model")
    v0 = views[0]
    cfg: dict[str, Any] = {"views": views}
    # geometry: meta wins, else the stem weights (first conv kernel = patch size, second = scale factor)
    chans, i = [], 0
    while f"enc_down_dict.{v0}.conv_blocks.{i}.patch_embed.conv.weight" in sd:
        chans.append(sd[f"enc_down_dict.{v0}.conv_blocks.{i}.patch_embed.conv.weight"].shape[0])
        i += 1
    cfg["conv_chans"] = list(meta.get("enc_conv_chans", chans))
    n_blocks = 0
    while f"enc_down_dict.{v0}.conv_blocks.0.conv.{n_blocks}.conv1.weight" in sd:
        n_blocks += 1
    cfg["conv_n_blocks"] = int(meta.get("enc_conv_n_blocks", n_blocks))

    def stem_kernel(v: str, stage: int) -> tuple[int, ...] | None:
        s = _shape(sd, f"enc_down_dict.{v}.conv_blocks.{stage}.patch_embed.conv.weight")
        return s[2:] if s else None

    patch, scale = {}, {}
    for v in views:
        patch[v] = list(meta.get("enc_patch_size", {}).get(v) or stem_kernel(v, 0))
        sc = meta.get("enc_scale_factor", {}).get(v) or stem_kernel(v, 1)
        if sc is None:
            raise CheckpointError(f"cannot infer the scale factor of view {v}; pass --meta")
        scale[v] = list(sc)
    cfg["patch_size"], cfg["scale_factor"] = patch, scale

    sizes = dict(image_size or meta.get("image_size") or {})
    extra = sorted(set(sizes) - set(views))
    if image_size and extra:  # a typo'd or absent view would otherwise be ignored silently
        raise CheckpointError(f"--image-size names view(s) {extra} the state dict does not have (views: "
                              f"{', '.join(views)})")
    for v in views:
        if v not in sizes:
            pe = _shape(sd, f"enc_down_dict.{v}.pos_embed")
            default = list(default_image_size(v))
            sizes[v] = default
            if pe is not None:
                from cinema_jax.models.conv_stem import effective_patch

                eff = effective_patch(patch[v], scale[v], len(cfg["conv_chans"]))
                if math.prod(s // p for s, p in zip(default, eff)) != pe[1]:
                    raise CheckpointError(f"image size of view {v} is not the default {default}: pass --meta or "
                                          f"--image-size")
    cfg["image_size"] = {v: list(sizes[v]) for v in views}

    cls = _shape(sd, "encoder.cls_token")
    if cls is None:
        raise CheckpointError("state dict has no encoder.cls_token: not a CineMA model")
    depth = 0
    while f"encoder.blocks.{depth}.attn.q.weight" in sd:
        depth += 1
    table = SIZES.get(size) if size else next((t for t in SIZES.values() if t["enc_embed_dim"] == cls[-1]), None)
    if size and table and "enc_n_heads" not in meta and table["enc_embed_dim"] != cls[-1]:
        raise CheckpointError(f"--size {size} has embed dim {table['enc_embed_dim']} but the state dict has "
                              f"{cls[-1]}; pass the matching --size or --meta with enc_n_heads / dec_n_heads")
    cfg["enc_embed_dim"] = int(meta.get("enc_embed_dim", cls[-1]))
    cfg["enc_depth"] = int(meta.get("enc_depth", depth))
    heads = meta.get("enc_n_heads", table["enc_n_heads"] if table else None)
    if heads is None:
        raise CheckpointError(f"cannot infer the number of heads for embed dim {cls[-1]}; pass --meta or --size")
    cfg["enc_n_heads"] = int(heads)
    cfg["mlp_ratio"] = float(meta.get("mlp_ratio", sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / cls[-1]
                                      if depth else 4))
    cfg["qkv_bias"] = bool(meta.get("qkv_bias", "encoder.blocks.0.attn.q.bias" in sd or depth == 0))
    cfg["norm_eps"] = float(meta.get("norm_eps", 1e-5))
    if kind == "mae":
        dec = _shape(sd, "dec_linear.weight")
        if dec is None:
            raise CheckpointError("state dict has no dec_linear: not a CineMA MAE (use --kind convvit|convunetr)")
        dd = 0
        while f"decoder.blocks.{dd}.attn.q.weight" in sd:
            dd += 1
        cfg["dec_embed_dim"] = int(meta.get("dec_embed_dim", dec[0]))
        cfg["dec_depth"] = int(meta.get("dec_depth", dd))
        dh = meta.get("dec_n_heads", table["dec_n_heads"] if table else None)
        if dh is None:
            raise CheckpointError("cannot infer the decoder heads; pass --meta or --size")
        cfg["dec_n_heads"] = int(dh)
    elif kind == "convvit":
        head = _shape(sd, "pred_head_dict.cls.weight")
        if head is None:
            raise CheckpointError("state dict has no pred_head_dict.cls: not a ConvViT")
        cfg["out_chans"] = int(head[0])
        cfg["reduce"] = str(meta.get("convvit_reduce", "all"))
    else:
        head = _shape(sd, f"pred_head_dict.{v0}.weight")
        if head is None or f"decoder_dict.{v0}.blocks.0.up.weight" not in sd:
            raise CheckpointError("state dict has no decoder_dict/pred_head_dict: not a ConvUNetR")
        cfg["out_chans"] = int(head[0])
        n_dec = 0
        while f"decoder_dict.{v0}.blocks.{n_dec}.up.weight" in sd:
            n_dec += 1
        dec_chans = [int(sd[f"decoder_dict.{v0}.blocks.{n_dec - 1 - j}.up.weight"].shape[0]) for j in range(n_dec)]
        cfg["dec_chans"] = list(meta.get("convunetr_dec_chans", dec_chans))
        dps, dss = {}, {}
        for v in views:
            group = "sax" if v == "sax" else "lax"
            mp = meta.get("convunetr_dec_patch_size", {})
            dps[v] = list(mp.get(v) or mp.get(group) or sd[f"decoder_dict.{v}.blocks.{n_dec - 1}.up.weight"].shape[2:])
            ms = meta.get("convunetr_dec_scale_factor", {})
            dss[v] = list(ms.get(v) or ms.get(group) or sd[f"decoder_dict.{v}.blocks.0.up.weight"].shape[2:])
        cfg["dec_patch_size"], cfg["dec_scale_factor"] = dps, dss
    return cfg


def build_from_config(kind: str, cfg: Mapping) -> Any:
    from cinema_jax.models import build_model

    try:
        return build_model(kind, dict(cfg))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot build a {kind} model from the config: {e}") from None


def example_inputs(model: Any, kind: str, batch: int = 1, in_chans: Mapping[str, int] | None = None) -> dict:
    """Zero images at the configured sizes (channel-last) for init / eval_shape."""
    import jax.numpy as jnp

    images = {}
    for v in model.views:
        size = model.view_geometry(v)[0]
        images[v] = jnp.zeros((batch,) + tuple(size) + (int((in_chans or {}).get(v, 1)),), jnp.float32)
    return images


def param_shapes(model: Any, kind: str, images: Mapping[str, Any]) -> dict:
    """Unboxed param shape tree via jax.eval_shape (no allocation)."""
    import flax.linen as nn
    import jax

    def init():
        rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
        return nn.meta.unbox(model.init(rngs, images, train=False)["params"])

    return jax.eval_shape(init)


@functools.lru_cache(maxsize=16)
def _cached_shapes(kind: str, cfg_json: str, chans: tuple) -> dict:
    model = build_from_config(kind, json.loads(cfg_json))
    return param_shapes(model, kind, example_inputs(model, kind, 1, dict(chans)))


def check_params(params: Mapping, shapes: Mapping, source: str) -> None:
    """Raise CheckpointError on unknown / missing keys or shape mismatches (paths in reference names)."""
    from flax.traverse_util import flatten_dict

    got = flatten_dict(dict(params))
    want = flatten_dict(dict(shapes))
    unknown = sorted(set(got) - set(want))
    if unknown:
        raise CheckpointError(f"{source}: unexpected key {path_to_ref_key(unknown[0])} "
                              f"({len(unknown)} unexpected) for this model")
    missing = sorted(set(want) - set(got))
    if missing:
        raise CheckpointError(f"{source}: missing key {path_to_ref_key(missing[0])} ({len(missing)} missing)")
    for p in sorted(want):
        if tuple(got[p].shape) != tuple(want[p].shape):
            raise CheckpointError(f"{source}: shape mismatch for {path_to_ref_key(p)}: checkpoint "
                                  f"{tuple(param_to_ref_value(p, np.zeros(got[p].shape)).shape)} vs model "
                                  f"{tuple(param_to_ref_value(p, np.zeros(want[p].shape)).shape)}")


def _in_chans(state_dict: Mapping[str, np.ndarray], views: list[str]) -> dict[str, int]:
    return {v: int(state_dict[f"enc_down_dict.{v}.conv_blocks.0.patch_embed.conv.weight"].shape[1]) for v in views}


def import_state_dict(state_dict: Mapping[str, np.ndarray], kind: str, cfg: Mapping, source: str = "state dict"):
    """-> (model, params) with params validated against the model built from `cfg`; every tensor (the pos_embed
    buffers too) must be floating point and finite."""
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] not in BOOKKEEPING:
            check_weight(value, key, source)
    model = build_from_config(kind, cfg)
    params, pos = state_dict_to_params(state_dict)
    chans = _in_chans(state_dict, list(model.views))
    try:  # the model factory checks some dims only at init (e.g. embed dim vs heads)
        shapes = _cached_shapes(kind, json.dumps(dict(cfg), sort_keys=True, default=list),
                                tuple(sorted(chans.items())))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot build a {kind} model for these weights ({e}); check --size / "
                              "--meta") from None
    check_params(params, shapes, source)
    expected = pos_embed_buffers(model, set(params))
    for key, value in pos.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key} for this model")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} but the configured grid gives "
                                  f"{tuple(expected[key].shape)} (image size / patch size mismatch)")
    return model, params


# ----------------------------------------------------------------------------------------------- fixtures
def _kind_of(name: str) -> str:
    for kind in ("mae", "convvit", "convunetr"):
        if name == kind or name.startswith(kind + "_"):
            return kind
    raise CheckpointError(f"unknown fixture name {name!r} (expected mae, convvit or convunetr_<view>)")


def upstream_fixture_outputs(fixture_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    """Run our model with converted reference weights on a fixture's inputs; outputs in the reference layouts.

    Reads `meta.json`, `<name>.safetensors` and only the `in_*` / `mask_*` arrays of `<name>.npz`.
    mae: `pred_<view>` (B, n_masked, pixels), `loss`, `metric_*`, `feat_cls` (B, 1, D), `feat_<view>` (B, N, D);
    convvit: `logits` (B, out); convunetr_*: `logits` (B, out, X, Y[, Z]) (one view) or `logits_<view>` (several).
    """
    import jax
    import jax.numpy as jnp

    fixture_dir = Path(fixture_dir)
    kind = _kind_of(name)
    meta_path = fixture_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from None
    sd = load_state_dict(fixture_dir / f"{name}.safetensors")
    npz_path = fixture_dir / f"{name}.npz"
    if not npz_path.is_file():
        raise CheckpointError(f"fixture inputs not found: {npz_path}")
    with np.load(npz_path) as z:
        names = list(z.files)
        inputs = {k[3:]: np.asarray(z[k]) for k in names if k.startswith("in_")}
        masks = {k[5:]: np.asarray(z[k]).astype(bool) for k in names if k.startswith("mask_")}
    if not inputs:
        raise CheckpointError(f"{npz_path} has no in_<view> arrays")
    cfg = infer_model_config(sd, kind, meta)
    model, params = import_state_dict(sd, kind, cfg, f"{name}.safetensors")
    order = [v for v in model.views if v in inputs]
    unknown = [v for v in inputs if v not in model.views]
    if unknown:
        raise CheckpointError(f"{npz_path}: inputs for views {unknown} the model does not have")
    images = {v: jnp.asarray(np.moveaxis(inputs[v], 1, -1), jnp.float32) for v in order}
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    out: dict[str, np.ndarray] = {}
    with jax.default_matmul_precision("float32"):
        if kind == "mae":
            # masks are closed over as numpy constants: their visible counts stay static under jit
            given = {v: masks[v] for v in order if v in masks}
            key = jax.random.key(int(meta.get("seed", 0)))
            res = jax.jit(lambda p, x, k: model.apply(p, x, given, train=False, rngs={"mask": k}))(
                variables, images, key)
            for v in order:
                out[f"pred_{v}"] = np.asarray(res["pred"][v], np.float32)
            out["loss"] = np.asarray(res["loss"], np.float32)
            for k, val in res["metrics"].items():
                out[f"metric_{k}"] = np.asarray(val, np.float32)
            feats = jax.jit(lambda p, x: model.apply(p, x, train=False, method=type(model).features))(
                variables, images)
            out["feat_cls"] = np.asarray(feats["cls"], np.float32)
            for v in order:
                out[f"feat_{v}"] = np.asarray(feats[v], np.float32)
        elif kind == "convvit":
            out["logits"] = np.asarray(jax.jit(lambda p, x: model.apply(p, x, train=False))(variables, images),
                                       np.float32)
        else:
            res = jax.jit(lambda p, x: model.apply(p, x, train=False))(variables, images)
            for v in order:
                out[f"logits_{v}"] = np.moveaxis(np.asarray(res[v], np.float32), -1, 1)
            if len(order) == 1:
                out["logits"] = out.pop(f"logits_{order[0]}")
    produced_keys = [k for k in names if not (k.startswith("in_") or k.startswith("mask_"))]
    if produced_keys and all(k in out for k in produced_keys):
        out = {k: out[k] for k in produced_keys}
    return out


# ----------------------------------------------------------------------------------------------- CLI
def _load_meta(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read meta file {path}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta file {path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _parse_sizes(items: list[str] | None) -> dict[str, list[int]] | None:
    if not items:
        return None
    out = {}
    for item in items:
        view, _, dims = item.partition("=")
        try:
            out[view] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise CheckpointError(f"--image-size expects VIEW=X,Y[,Z], got {item!r}") from None
        if not view or not out[view]:
            raise CheckpointError(f"--image-size expects VIEW=X,Y[,Z], got {item!r}")
        if view not in VIEWS:
            raise CheckpointError(f"--image-size: unknown view {view!r} in {item!r} (views: {', '.join(VIEWS)})")
        if len(out[view]) != (3 if view == "sax" else 2) or min(out[view]) < 1:
            raise CheckpointError(f"--image-size: {view} needs {'X,Y,Z' if view == 'sax' else 'X,Y'} positive "
                                  f"integers, got {item!r}")
    return out


def _check_out_dir(out_dir: str | Path, overwrite: bool, sources=()) -> None:
    """Refuse an unusable output before any work: replacing a directory cinema-jax did not write (e.g. a training
    workdir or the folder holding the source weights, given by mistake) would delete whatever it holds."""
    from cinema_jax.fileutil import check_output_dir

    try:
        check_output_dir(out_dir, overwrite, sources)
    except CinemaError as e:
        raise CheckpointError(str(e)) from None


def cmd_import(args: argparse.Namespace) -> int:
    from cinema_jax.train.checkpoint import save_params

    overwrite = bool(getattr(args, "overwrite", False))
    sources = (args.src, getattr(args, "ref_config", None), getattr(args, "meta", None))
    _check_out_dir(args.out_dir, overwrite, sources)
    if args.kind == "snraware":
        from cinema_jax import convert_snraware

        if not args.ref_config:
            raise ConfigError("--kind snraware needs --ref-config (the reference's training .yaml)")
        return convert_snraware.cmd_import(args.src, args.ref_config, args.out_dir, overwrite=overwrite,
                                           sources=sources)

    sd = load_state_dict(args.src)
    cfg = infer_model_config(sd, args.kind, _load_meta(args.meta), args.size, _parse_sizes(args.image_size))
    _, params = import_state_dict(sd, args.kind, cfg, str(args.src))
    config = {"task": {"mae": "pretrain_mae", "convvit": "classify", "convunetr": "segment"}[args.kind],
              "model_kind": args.kind, "model": cfg, "converted_from": str(args.src)}
    save_params(args.out_dir, params, config, overwrite=overwrite, sources=sources)
    n = sum(int(np.prod(np.shape(x))) for x in _leaves(params))
    print(f"imported {args.kind} ({len(cfg['views'])} views, {n:,} params) from {args.src} -> {args.out_dir}")
    return 0


def _leaves(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


def _model_kind(model: Any) -> str | None:
    from cinema_jax.models import CineMA, ConvUNetR, ConvViT

    for cls, kind in ((CineMA, "mae"), (ConvViT, "convvit"), (ConvUNetR, "convunetr")):
        if isinstance(model, cls):
            return kind
    return None


def _check_exportable(config: Any, source: str) -> None:
    """CheckpointError for a checkpoint with no reference state-dict format: denoise, unknown or missing tasks."""
    task = str(get(config, "task", "") or "")  # optional: older converted imports name none
    if task == "denoise":
        raise CheckpointError(f"{source}: a denoise (SNRAware) checkpoint; export writes CineMA reference state "
                              "dicts only (exporting SNRAware weights is not supported)")
    if not task:
        raise CheckpointError(f"{source}: no config.json naming the task; export needs the run's config to build "
                              "its model")
    if task not in CINEMA_TASKS:
        raise CheckpointError(f"{source}: task {task!r} cannot be exported (CineMA tasks: {', '.join(CINEMA_TASKS)})")


def export_source(ckpt: str | Path) -> tuple[Any, Any, str]:
    """-> (params, model, kind) the checkpoint was trained as, params checked against the model: a converted
    import's own model config (`model_kind`), else the run's task model (`train.restore.load_run`; `make_model` adds
    the trained image sizes from `config.data`, so the exported pos_embeds are the trained ones)."""
    import flax.linen as nn

    from cinema_jax.models.transfer import _strip
    from cinema_jax.train.checkpoint import load_config, load_params
    from cinema_jax.train.restore import load_run

    config = load_config(ckpt)
    kind = get(config, "model_kind", None)  # optional: only converted imports carry it
    if kind is None or get(config, "model", None) is None:
        _check_exportable(config, str(ckpt))
        run = load_run(ckpt, CINEMA_TASKS)
        kind = _model_kind(run.model)
        if kind is None:
            raise CheckpointError(f"{ckpt}: task {run.task.name!r} builds a {type(run.model).__name__}, which has no "
                                  "reference state dict format")
        return run.params, run.model, kind
    if kind not in KINDS:
        raise CheckpointError(f"{ckpt}: config.json has unknown model_kind {kind!r}")
    params, _ = load_params(ckpt)
    params = nn.meta.unbox(_strip(params))
    model = build_from_config(kind, to_plain(get(config, "model")))
    try:
        shapes = param_shapes(model, kind, example_inputs(model, kind, 1, _param_in_chans(params, model.views)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: its config does not build a {kind} model ({e})") from None
    check_params(params, shapes, str(ckpt))  # an export is only meaningful for the exact architecture
    return params, model, kind


def _param_in_chans(params: Mapping, views) -> dict[str, int]:
    out = {}
    for v in views:
        try:
            out[v] = int(np.shape(params[f"enc_down_{v}"]["conv_blocks_0"]["patch_embed"]["conv"]["kernel"])[-2])
        except (KeyError, TypeError, IndexError):
            out[v] = 1  # check_params then names the missing stem
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from cinema_jax.fileutil import check_not_source

    if Path(args.out).suffix != ".safetensors":
        raise CheckpointError(f"export writes safetensors: the output name must end in .safetensors, got {args.out}")
    out = Path(args.out)
    if out.is_dir():
        raise CheckpointError(f"export output {out} is an existing directory")
    if out.exists() and not getattr(args, "overwrite", False):
        raise CheckpointError(f"export output {out} already exists (pass --overwrite to replace it)")
    try:
        check_not_source(out, (args.ckpt_dir,), "export output")
    except CinemaError as e:
        raise CheckpointError(str(e)) from None
    params, model, kind = export_source(args.ckpt_dir)
    if args.kind and args.kind != kind:
        raise CheckpointError(f"{args.ckpt_dir}: holds a {kind} model, not {args.kind} (drop --kind or pass "
                              f"--kind {kind})")
    sd = params_to_state_dict(params, model)
    save_state_dict(args.out, sd)
    print(f"exported {len(sd)} tensors ({kind}) from {args.ckpt_dir} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cinema-jax convert import SRC OUT_DIR --kind K [--meta M | --size S]` / `convert export CKPT OUT`."""
    parser = argparse.ArgumentParser(prog="cinema-jax convert",
                                     description="reference PyTorch CineMA weights <-> cinema-jax checkpoints")
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="reference state dict (.safetensors / .pt; SNRAware also .pts / .ckpt) "
                                        "-> checkpoint directory")
    imp.add_argument("src")
    imp.add_argument("out_dir")
    imp.add_argument("--kind", required=True, choices=(*KINDS, "snraware"))
    imp.add_argument("--ref-config", help="snraware: the reference's training config (.yaml / .json)")
    imp.add_argument("--meta", help="meta.json with views, image sizes, patch sizes, dims, heads (fixture format)")
    imp.add_argument("--size", choices=("tiny", "base", "large", "huge"), help="ViT size (for the head counts)")
    imp.add_argument("--image-size", action="append", metavar="VIEW=X,Y[,Z]",
                     help="configured image size of a view (default sax 192,192,16 / lax 256,256)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace an OUT_DIR an earlier import wrote (never a folder cinema-jax did not write)")
    exp = sub.add_parser("export", help="checkpoint (workdir or checkpoint dir) -> reference .safetensors")
    exp.add_argument("ckpt_dir")
    exp.add_argument("out", help="OUT.safetensors")
    exp.add_argument("--kind", choices=KINDS, help="model kind (default: from the checkpoint config)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT.safetensors")
    args = parser.parse_args(argv)
    if args.action == "import":
        return cmd_import(args)
    return cmd_export(args)
