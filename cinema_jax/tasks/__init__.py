"""Task registry: `get_task(name)` imports `cinema_jax.tasks.<module>` lazily and returns its `TASK`.

Why lazy: a task pulls in its own models and data code; training one task must not import (or break on) the others.
"""

from __future__ import annotations

import importlib

from cinema_jax.errors import ConfigError

TASK_MODULES = {
    "pretrain_mae": "cinema_jax.tasks.pretrain_mae",
    "segment": "cinema_jax.tasks.segment",
    "classify": "cinema_jax.tasks.classify",
    "regress": "cinema_jax.tasks.regress",
    "landmark": "cinema_jax.tasks.landmark",
    "denoise": "cinema_jax.tasks.denoise",
}

_EXTRA: dict[str, object] = {}


def register_task(task) -> None:
    """Register a task object under `task.name` (tests and plug-ins; built-in tasks need no registration)."""
    _EXTRA[task.name] = task


def get_task(name: str):
    if name in _EXTRA:
        return _EXTRA[name]
    module_name = TASK_MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(sorted(set(TASK_MODULES) | set(_EXTRA)))}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"task {name!r} is not available ({module_name} is missing)") from None
        raise
    return module.TASK
