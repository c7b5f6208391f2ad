"""Experiment configs: load `configs/NAME.py[:variant]` and apply typed `key.sub=value` overrides.

Why a small loader instead of absl `config_flags`: the CLI keeps its own argument parsing (and one-line errors, exit
code 2), tests call it directly, and overrides are type-checked against the value already in the config so a typo
(`--config.optim.lr=1e-3x`, `--config.optm.lr=...`) fails before any work starts.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from cinema_jax.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _config_package(directory: Path) -> str:
    """A package standing for `directory`, so config files in it can import their siblings (`from . import
    common`) wherever the directory is and whatever the working directory."""
    import types

    name = f"_cinema_configs_{abs(hash(str(directory)))}"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(directory)]
        sys.modules[name] = pkg
    return name


def _import_config_module(path: Path):
    package = _config_package(path.resolve().parent)
    name = f"{package}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure while importing the config is a config problem
        sys.modules.pop(name, None)
        raise ConfigError(f"cannot import config file {path}: {type(e).__name__}: {e}") from None
    return module


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`configs/x.py:variant` -> (path, variant or None)."""
    path, _, variant = spec.partition(":")
    return Path(path), (variant or None)


def load_module(spec: str):
    path, _ = split_spec(spec)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return _import_config_module(path)


def load_base(spec: str) -> ml_collections.ConfigDict:
    """The config of `path.py[:variant]` before overrides."""
    module = load_module(spec)
    _, variant = split_spec(spec)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {split_spec(spec)[0]} has no get_config(arg)")
    try:
        config = module.get_config(variant) if variant is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - bad variant names etc. surface as one line
        raise ConfigError(f"{spec}: get_config failed: {type(e).__name__}: {e}") from None
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{spec}: get_config must return an ml_collections.ConfigDict")
    return config


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"--config.{key}: expected a boolean (true/false), got {text!r}")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` into the type of `current` (the value the config already holds)."""
    if isinstance(current, bool):
        return _parse_bool(key, text)
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise ConfigError(f"--config.{key}: expected an integer, got {text!r}") from None
            if as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"--config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = _literal(text)
        if isinstance(value, str):  # bare comma list: 1,2,3 or a,b
            value = [_literal(v.strip()) for v in text.split(",") if v.strip()]
        if not isinstance(value, (tuple, list)):
            value = [value]
        if current and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in current):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"--config.{key}: expected a list of numbers, got {text!r}")
            kind = float if any(isinstance(c, float) for c in current) else int
            if kind is int and any(isinstance(v, float) and not float(v).is_integer() for v in value):
                raise ConfigError(f"--config.{key}: expected a list of integers, got {text!r}")
            value = [kind(v) for v in value]
        return type(current)(value)
    if current is None:
        return _literal(text)
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        value = _literal(text)
        if not isinstance(value, dict):
            raise ConfigError(f"--config.{key}: expected a dict literal, got {text!r}")
        return value
    raise ConfigError(f"--config.{key}: cannot override a value of type {type(current).__name__}")


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, text = override.split("=", 1)
    key = key.strip()
    if key.startswith("--config."):
        key = key[len("--config."):]
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (in --config.{key})")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    value = parse_value(key, text, node[leaf])
    if isinstance(node[leaf], ml_collections.ConfigDict):
        for k in value:
            if k not in node[leaf]:
                raise ConfigError(f"unknown config key {key}.{k}")
        node[leaf].update(value)
        return
    try:
        with node.ignore_type():
            node[leaf] = value
    except Exception as e:  # noqa: BLE001 - ConfigDict type errors
        raise ConfigError(f"--config.{key}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    for override in overrides or ():
        apply_override(config, override)
    return config


def split_config_flags(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """Separate absl-style `--config=SPEC` / `--config.key=value` flags from the rest -> (rest, spec, overrides)."""
    rest, spec, overrides = [], None, []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.split("=", 1)[1] if "=" in arg else next(it, None)
        elif arg.startswith("--config."):
            if "=" not in arg:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{arg} needs a value")
                arg = f"{arg}={value}"
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, spec, overrides


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """`configs/NAME.py[:variant]` + overrides `['key.sub=value', ...]` -> ConfigDict (ConfigError on problems)."""
    if not spec:
        raise ConfigError("a config spec configs/NAME.py[:variant] is required")
    config = apply_overrides(load_base(spec), overrides)
    validate_common(config)
    return config


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Range checks on the keys every task config shares (only those present are checked)."""
    def positive(key):
        if key in config and int(config[key]) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {config[key]}")

    for key in ("total_steps", "batch_size", "grad_accum"):
        positive(key)
    for key in ("log_every", "checkpoint_every", "eval_every", "image_every"):
        if key in config and int(config[key]) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {config[key]}")
    if "precision" in config and config.precision not in ("float32", "bfloat16"):
        raise ConfigError(f"config key 'precision' must be float32 or bfloat16, got {config.precision!r}")
    if "remat" in config and config.remat not in ("none", "block", "dots", "full"):
        raise ConfigError(f"config key 'remat' must be none, block, dots or full, got {config.remat!r}")
    if "attention" in config and config.attention not in ("explicit", "xla", "cudnn"):
        raise ConfigError(f"config key 'attention' must be explicit, xla or cudnn, got {config.attention!r}")
    if "on_nonfinite" in config and config.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config key 'on_nonfinite' must be stop or skip, got {config.on_nonfinite!r}")
    if "grad_accum" in config and "batch_size" in config and config.batch_size % config.grad_accum:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by grad_accum {config.grad_accum}")
    if "mesh" in config:
        for axis in ("data", "fsdp", "tensor"):
            if axis not in config.mesh:
                raise ConfigError(f"config key 'mesh.{axis}' is missing")
            v = int(config.mesh[axis])
            if v == 0 or v < -1:
                raise ConfigError(f"config key 'mesh.{axis}' must be >= 1 or -1, got {v}")
    if isinstance(config.get("optim"), ml_collections.ConfigDict):
        _validate_optim(config.optim)
    data = config.get("data")
    if isinstance(data, ml_collections.ConfigDict) and "views" in data:
        _validate_views(data.views)


def _number(key: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    return x


def _validate_optim(optim: ml_collections.ConfigDict) -> None:
    """Values that would otherwise train to NaN or diverge silently (a negative lr ascends the loss)."""
    for key in ("lr", "min_lr", "weight_decay", "clip_norm", "layer_decay", "warmup_steps"):
        if key in optim and optim[key] is not None and _number(f"optim.{key}", optim[key]) < 0:
            raise ConfigError(f"config key 'optim.{key}' must be >= 0, got {optim[key]}")
    for key in ("b1", "b2"):
        if key in optim and not 0 <= _number(f"optim.{key}", optim[key]) < 1:
            raise ConfigError(f"config key 'optim.{key}' must be in [0, 1), got {optim[key]}")
    if "eps" in optim and _number("optim.eps", optim.eps) <= 0:
        raise ConfigError(f"config key 'optim.eps' must be > 0, got {optim.eps}")
    if "schedule" in optim and optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"config key 'optim.schedule' must be cosine or constant, got {optim.schedule!r}")


def _validate_views(views: Any) -> None:
    """Known view names, checked up front: an unknown one would otherwise fail inside a data worker mid-run."""
    from cinema_jax.data.phantom import VIEWS

    names = [views] if isinstance(views, str) else list(views or ())
    bad = [v for v in names if v not in VIEWS]
    if not names or bad:
        raise ConfigError(f"config key 'data.views': unknown view {bad[0]!r}; choose from {', '.join(VIEWS)}" if bad
                          else "config key 'data.views' must name at least one view")
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'data.views' repeats a view: {list(names)}")


# ------------------------------------------------------------------------------------------------ the one reader
_REQUIRED = object()


def get(cfg: Any, key: str, default: Any = _REQUIRED) -> Any:
    """`cfg["a"]["b"]` for `key="a.b"` in a ConfigDict / FrozenConfigDict / dict (a config.json read back).

    Without `default` a missing key is a ConfigError naming it: every key a module reads is in the resolved config
    (the config files define it once), so a misspelt key can never fall back silently to a default. `default` is for
    the few keys that are optional by design (say so where it is used), e.g. keys older run configs lack."""
    node = cfg
    for i, part in enumerate(key.split(".")):
        present = hasattr(node, "keys") and part in node  # a leaf value where a section was expected: absent
        if not present:
            if default is _REQUIRED:
                where = key if i == 0 else f"{key} (no {'.'.join(key.split('.')[:i + 1])!r})"
                raise ConfigError(f"config key {where} is missing")
            return default
        node = node[part]
    return node


def to_plain(config) -> Any:
    """ConfigDict / FrozenConfigDict / nested mappings and tuples -> JSON-friendly dicts and lists."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(k): to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    return config


def from_plain(data: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(data)
