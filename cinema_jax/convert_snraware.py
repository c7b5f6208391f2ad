r"""Reference SNRAware (PyTorch) denoiser weights -> our `imaging_transformer.DenoisingModel` params.

The published checkpoints (Hugging Face `microsoft/SNRAware`: small / large, each a TorchScript `.pts` plus the
training `.yaml`) load directly: `load_snraware("snraware_small_model.pts", "snraware_small_model.yaml")` ->
(model, params). Torch is not a dependency: TorchScript archives and torch zip checkpoints (`.pth` / `.pt` /
Lightning `.ckpt`) are read by `cinema_jax.torchfile`, a restricted unpickler that only rebuilds tensors (each view
bounded by its storage) and module attribute trees (every other pickled object is rebuilt as an inert stand-in
object; nothing is imported or executed). To get a plain state dict instead, export it once with torch installed
elsewhere (one command, run outside this package):

    python -c "import sys, torch, safetensors.torch as st; \
      m = torch.jit.load(sys.argv[1], map_location='cpu'); \
      st.save_file({k: v.contiguous() for k, v in m.state_dict().items() if v.is_floating_point()}, sys.argv[2])" \
      snraware_small_model.pts snraware_small.safetensors

and pass the `.safetensors` file instead.

Name rules (reference key -> our param path), applied token by token:
  `bk` -> `backbone`; the `block` level inside a Block, the `.conv` wrapper of every conv and the `.ln` of every norm
  are dropped; `n1`/`n2` -> `norm1`/`norm2`; `mlp.0` / `mlp.2` -> `mixer_in` / `mixer_out`; `mlp.1.weight` (the PReLU
  slope) -> `prelu`; U-Net `attention_<i>.conv_*` -> `attention_<i>_conv_*`; leaf `weight` -> `kernel` (convs) or
  `scale` (norms). Layouts: conv (out, in, kh, kw) -> (kh, kw, in, out) with (h, w) = our (x, y); LayerNorm (C, H, W)
  -> (X, Y, C); the relative position tables and biases are copied. Buffers (`relative_position_index`, the
  temporal `mask`) are derived, not loaded. Model inputs are (B, 3, T, H, W) there and (B, X, Y, T, 3) here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cinema_jax.convert import BOOKKEEPING, check_weight, is_float
from cinema_jax.errors import CheckpointError, ConfigError
from cinema_jax.torchfile import read_state_dict

BUFFERS = ("relative_position_index", "mask")
_NORMS = {"n1": "norm1", "n2": "norm2"}
_MIXER = {"0": "mixer_in", "2": "mixer_out"}
# the released denoisers' cell options; anything else is a different architecture
_CELL_DEFAULTS = dict(attention_type="conv", mixer_type="conv", norm_mode="layer", cosine_att=True,
                      att_with_relative_position_bias=True, att_with_output_proj=True, activation_func="prelu",
                      upsample_method="linear", window_sizing_method="mixed")


# ----------------------------------------------------------------------------------------------- names and layouts
def ref_key_to_path(key: str) -> tuple[str, ...] | None:
    """Reference state-dict key -> our param path; None for derived buffers."""
    tokens = key.split(".")
    if tokens[-1] in BUFFERS:
        return None
    body, leaf = tokens[:-1], tokens[-1]
    out: list[str] = []
    is_norm = False
    i = 0
    while i < len(body):
        t = body[i]
        if t == "bk" and i == 0:
            out.append("backbone")
        elif t in ("block", "conv", "ln"):
            pass
        elif t in _NORMS:
            out.append(_NORMS[t])
            is_norm = True
        elif t == "mlp" and i + 1 < len(body):
            nxt = body[i + 1]
            i += 1
            if nxt == "1":
                if leaf != "weight" or i + 1 != len(body):
                    raise CheckpointError(f"cannot map reference key {key}")
                return tuple(out) + ("prelu",)
            if nxt not in _MIXER:
                raise CheckpointError(f"cannot map reference key {key}")
            out.append(_MIXER[nxt])
        elif t.startswith("attention_") and i + 1 < len(body) and body[i + 1].startswith("conv_"):
            out.append(f"{t}_{body[i + 1]}")
            i += 1
        else:
            out.append(t)
        i += 1
    if leaf == "weight":
        leaf = "scale" if is_norm else "kernel"
    return tuple(out) + (leaf,)


def path_to_ref_key(path: tuple[str, ...]) -> str:
    """Our param path -> the reference key (for messages and export)."""
    parts: list[str] = []
    body, leaf = list(path[:-1]), path[-1]
    if leaf == "prelu":
        return ".".join(_ref_body(body) + ["mlp", "1", "weight"])
    parts = _ref_body(body)
    if leaf == "scale":
        return ".".join(parts + ["ln", "weight"])
    if body and body[-1] in ("norm1", "norm2"):
        return ".".join(parts + ["ln", leaf])
    if leaf in ("kernel", "bias"):
        inner = ["conv", "conv"] if len(body) >= 2 and body[-1].startswith(("D2_", "U2_")) else ["conv"]
        return ".".join(parts + inner + ["weight" if leaf == "kernel" else "bias"])
    return ".".join(parts + [leaf])


def _ref_body(body: list[str]) -> list[str]:
    out: list[str] = []
    for j, t in enumerate(body):
        if t == "backbone" and j == 0:
            out.append("bk")
        elif t in ("norm1", "norm2"):
            out.append({"norm1": "n1", "norm2": "n2"}[t])
        elif t in ("mixer_in", "mixer_out"):
            out += ["mlp", {"mixer_in": "0", "mixer_out": "2"}[t]]
        elif t.startswith("attention_") and "_conv_" in t:
            a, b = t.split("_conv_", 1)
            out += [a, f"conv_{b}"]
        elif t.startswith(("down_", "up_")) and j == 1:
            out += [t, "block"]
        elif j == 1 and body[0] == "backbone" and j + 1 < len(body) and body[j + 1].startswith("cell_"):
            out += [t, "block"]
        else:
            out.append(t)
    return out


def ref_value_to_param(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Reference tensor -> our layout for the param at `path`."""
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if len(path) >= 2 and path[-2] in ("norm1", "norm2") and value.ndim == 3:
        return value.transpose(1, 2, 0)
    return value


def param_to_ref_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if len(path) >= 2 and path[-2] in ("norm1", "norm2") and value.ndim == 3:
        return value.transpose(2, 0, 1)
    return value


def params_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our params -> a reference state dict (parameters only; buffers are derived by the reference on load)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(_unbox(params))
    return {path_to_ref_key(p): np.ascontiguousarray(param_to_ref_value(p, np.asarray(v))) for p, v in flat.items()}


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------------------------- config
def model_kwargs_from_config(cfg: Mapping, source: str = "config") -> dict[str, Any]:
    """Reference training config (the checkpoint's yaml, or a fixture's meta entry: `backbone` + `dataset`) ->
    `DenoisingModel` fields. Raises ConfigError for options the released denoisers do not use."""
    try:
        bb = cfg["backbone"]
        cell = bb["block"]["cell"]
        name = str(bb["name"]).lower()
        levels = int(bb.get("num_resolution_levels", 2))
        strings = [str(s) for s in bb["block_str"]]
        cutout = [int(v) for v in cfg["dataset"]["cutout_shape"]]
        window = [int(v) for v in cell["window_size"]][:2]
        patch = [int(v) for v in cell["patch_size"]][:2]
        kw = dict(backbone=name, width=int(bb["num_of_channels"]), heads=int(cell["n_head"]),
                  mixer_ratio=float(cell.get("scale_ratio_in_mixer", 4.0)), drop_path=float(cell.get("dropout_p", 0.1)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: not an SNRAware config ({type(e).__name__}: {e})") from None
    if name not in ("hrnet", "unet"):
        raise ConfigError(f"{source}: backbone {bb['name']!r} is not supported (HRnet, Unet)")
    bad = {k: cell.get(k) for k, v in _CELL_DEFAULTS.items() if k in cell and cell.get(k) != v}
    block = bb.get("block", {})
    if str(block.get("cell_type", "sequential")).lower() != "sequential":
        bad["cell_type"] = block.get("cell_type")
    if block.get("block_dense_connection", False):
        bad["block_dense_connection"] = True
    temporal = cell.get("temporal") or {}
    if temporal.get("temporal_multi_head_att_on_C_H_W", False):
        bad["temporal_multi_head_att_on_C_H_W"] = True
    if list(temporal.get("stride_qk", [1, 1, 1])) != [1, 1, 1]:
        bad["temporal.stride_qk"] = list(temporal["stride_qk"])
    if (cell.get("spatial_global") or {}).get("shuffle_in_window", False):
        bad["shuffle_in_window"] = True
    if float(cell.get("att_dropout_p", 0.0)) != 0.0:
        bad["att_dropout_p"] = cell["att_dropout_p"]
    if name == "unet" and not bb.get("use_unet_attention", True):
        bad["use_unet_attention"] = False
    if bad:
        k = next(iter(bad))
        raise ConfigError(f"{source}: option {k}={bad[k]!r} is not supported (the released denoisers use "
                          f"{_CELL_DEFAULTS.get(k, 'the default')!r})")
    strings = (strings + [strings[-1]] * levels)[:levels]
    kw.update(block_str=tuple(strings), window=tuple(window), patch=tuple(patch), image_size=tuple(cutout[:2]))
    return kw


def load_config(path: str | Path) -> dict:
    """The reference's yaml config (or a json file holding the same structure)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        # one line: yaml's errors span several lines (context, marks, a caret)
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------------------------- files
def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A reference state dict from `.safetensors`, a TorchScript archive (`.pts`, the published format) or a torch
    zip checkpoint (`.pth`, `.pt`, `.ckpt`: a state dict, or a dict holding one under `state_dict` /
    `model_state_dict` / `model`), the last two read without torch (`cinema_jax.torchfile`). Floating tensors come
    as float32; the derived integer buffers (BUFFERS, BatchNorm step counters) are dropped; any other tensor is kept
    as it is, so `import_state_dict` refuses it if it sits where a weight belongs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state dict not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            sd = dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    elif path.suffix in (".pth", ".pt", ".ckpt", ".pts"):
        sd = read_state_dict(path)
    else:
        raise CheckpointError(f"unsupported state dict format {path.suffix!r} (.safetensors, .pts, .pth, .pt, .ckpt): "
                              f"{path}")
    out = {}
    for key, value in sd.items():
        if is_float(value):
            out[key] = np.asarray(value, np.float32)
        elif key.rsplit(".", 1)[-1] not in (*BUFFERS, *BOOKKEEPING):
            out[key] = value
    return out


def _strip_prefix(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Drop a wrapper prefix ('model.', 'module.', '_orig_mod.', ...) found before the stem key 'pre.conv.weight'."""
    stem = [k for k in sd if k.endswith("pre.conv.weight")]
    if not stem:
        raise CheckpointError(f"{source}: no 'pre.conv.weight' stem: not an SNRAware denoiser state dict")
    prefix = min(stem, key=len)[: -len("pre.conv.weight")]
    if not prefix:
        return dict(sd)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------- import
@functools.lru_cache(maxsize=8)
def _param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    x = jnp.zeros((1, *model.image_size, 2, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    flat = traverse_util.flatten_dict(_unbox(shapes["params"]))
    return {p: tuple(v.shape) for p, v in flat.items()}


def _build(model_kwargs: Mapping[str, Any], source: str):
    from cinema_jax.models.imaging_transformer import DenoisingModel

    try:
        model = DenoisingModel(**dict(model_kwargs))
        return model, _param_shapes(model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: cannot build the model from the config: {e}") from None


def check_shapes(ref_shapes: Mapping[str, tuple[int, ...]], model_kwargs: Mapping[str, Any],
                 source: str = "state dict") -> dict[str, tuple[str, ...]]:
    """Check reference key -> shape against the model of `model_kwargs` without any weights; -> key -> our path for
    the keys that are params. CheckpointError on a missing or unexpected key or a shape mismatch."""
    _, shapes = _build(model_kwargs, source)
    found: dict[str, tuple[str, ...]] = {}
    for key, shape in ref_shapes.items():
        path = ref_key_to_path(key)
        if path is None:
            continue
        if path not in shapes:
            raise CheckpointError(f"{source}: unexpected key {key} for this model configuration")
        want = tuple(param_to_ref_value(path, np.zeros(shapes[path], np.float32)).shape)
        if tuple(shape) != want:
            raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(shape)}, model expects "
                                  f"{want}")
        found[key] = path
    missing = sorted(set(shapes) - set(found.values()))
    if missing:
        raise CheckpointError(f"{source}: missing key {path_to_ref_key(missing[0])} ({len(missing)} missing)")
    return found


def _param_path(key: str) -> tuple[str, ...] | None:
    try:
        return ref_key_to_path(key)
    except CheckpointError:
        return None


def import_state_dict(state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any],
                      source: str = "state dict", **model_overrides):
    """-> (DenoisingModel, params) with every reference tensor placed; CheckpointError on a missing or unexpected key,
    a shape mismatch, or a weight that is not floating point or not finite. `model_overrides` (e.g. dtype, remat,
    tile_overlap) are passed to the model only."""
    from flax import traverse_util

    sd = _strip_prefix(state_dict, source)
    model, shapes = _build(model_kwargs, source)
    # a non-float tensor is ignored unless it sits where a weight belongs (then check_weight names it)
    sd = {k: v for k, v in sd.items() if is_float(v) or _param_path(k) in shapes}
    paths = check_shapes({k: tuple(np.shape(v)) for k, v in sd.items()}, model_kwargs, source)
    for key in paths:
        check_weight(sd[key], key, source)
    flat = {p: ref_value_to_param(p, sd[k]) for k, p in paths.items()}
    if model_overrides:
        model = model.clone(**model_overrides)
    return model, traverse_util.unflatten_dict(flat)


def load_snraware(weights: str | Path, config: str | Path | Mapping, **model_overrides):
    """(model, params) from a reference state dict file and its training config (yaml/json path or mapping)."""
    cfg = load_config(config) if isinstance(config, (str, Path)) else config
    kw = model_kwargs_from_config(cfg, str(config) if isinstance(config, (str, Path)) else "config")
    return import_state_dict(load_state_dict(weights), kw, Path(weights).name, **model_overrides)


def to_model_layout(x: np.ndarray) -> np.ndarray:
    """Reference input (B, C, T, H, W) -> ours (B, X, Y, T, C)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 4, 2, 1))


def to_reference_layout(y: np.ndarray) -> np.ndarray:
    """Our output (B, X, Y, T, C) -> the reference's (B, C, T, H, W)."""
    return np.ascontiguousarray(np.asarray(y).transpose(0, 4, 3, 1, 2))


# ----------------------------------------------------------------------------------------------- fixtures
def fixture_config(fixture_dir: str | Path, name: str) -> dict:
    meta_path = Path(fixture_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from None
    entry = meta.get("fixtures", {}).get(name)
    if entry is None:
        raise CheckpointError(f"{meta_path}: no fixture {name!r} (have {sorted(meta.get('fixtures', {}))})")
    return entry


def snraware_fixture_outputs(fixture_dir: str | Path, name: str = "hrnet") -> dict[str, np.ndarray]:
    """Run our model with converted reference weights on a fixture's input; {'output': (B, 2, T, H, W)} in the
    reference layout, to compare with the fixture's `output` array. Reads `meta.json`, `<name>.safetensors` and only
    the `input` array of `<name>.npz`."""
    import jax
    import jax.numpy as jnp

    fixture_dir = Path(fixture_dir)
    entry = fixture_config(fixture_dir, name)
    model, params = import_state_dict(load_state_dict(fixture_dir / f"{name}.safetensors"),
                                      model_kwargs_from_config(entry, f"meta.json:{name}"), f"{name}.safetensors")
    npz_path = fixture_dir / f"{name}.npz"
    if not npz_path.is_file():
        raise CheckpointError(f"fixture inputs not found: {npz_path}")
    with np.load(npz_path) as z:
        if "input" not in z.files:
            raise CheckpointError(f"{npz_path} has no 'input' array")
        x = to_model_layout(z["input"]).astype(np.float32)
    with jax.default_matmul_precision("float32"):
        y = jax.jit(lambda p, v: model.apply({"params": p}, v, train=False))(
            jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x))
    return {"output": to_reference_layout(np.asarray(y, np.float32))}


# ----------------------------------------------------------------------------------------------- CLI
def denoise_config(model_kwargs: Mapping[str, Any], source: str):
    """A `configs/denoise.py:paper` config whose model is the converted one, so `cinema-jax infer denoise` and
    fine-tuning (`--config.init_from`) can use the imported checkpoint."""
    from cinema_jax.config import load_base

    config = load_base(str(Path(__file__).resolve().parents[1] / "configs" / "denoise.py") + ":paper")
    m = config.model
    m.backbone, m.width, m.heads = model_kwargs["backbone"], int(model_kwargs["width"]), int(model_kwargs["heads"])
    m.block_str, m.window = tuple(model_kwargs["block_str"]), tuple(model_kwargs["window"])
    m.patch, m.image_size = tuple(model_kwargs["patch"]), tuple(model_kwargs["image_size"])
    m.mixer_ratio, m.drop_path = float(model_kwargs["mixer_ratio"]), float(model_kwargs["drop_path"])
    config.precision = "float32"  # the reference numerics; bf16 is a training-time choice
    config = config.to_dict()
    config["converted_from"] = source
    return config


def cmd_import(src: str | Path, ref_config: str | Path, out_dir: str | Path, overwrite: bool = False,
               sources=()) -> int:
    """`cinema-jax convert import --kind snraware SRC OUT_DIR --ref-config CONFIG.yaml` -> params checkpoint."""
    import jax

    from cinema_jax.train.checkpoint import save_params

    cfg = load_config(ref_config)
    kw = model_kwargs_from_config(cfg, str(ref_config))
    _, params = import_state_dict(load_state_dict(src), kw, Path(src).name)
    save_params(out_dir, params, denoise_config(kw, str(src)), overwrite=overwrite,
                sources=tuple(sources) or (src, ref_config))
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    print(f"imported snraware {kw['backbone']} ({n:,} params, tile {kw['image_size']}) from {src} -> {out_dir}")
    return 0
