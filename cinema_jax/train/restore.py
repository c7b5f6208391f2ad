"""A trained run, ready to use: its params (checksums verified), its config, and the model that config builds, with
the params checked against that model before anything applies them.

Why one function: `cinema-jax eval`, every `infer` command and `convert export` all start from "load config -> build
model -> eval_shape -> compare params"; a checkpoint that does not fit its config is one CheckpointError naming the
first difference, not a Flax scope error from deep inside `apply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinema_jax.config import get
from cinema_jax.errors import CheckpointError


@dataclass
class Run:
    task: Any  # the Task (cinema_jax.tasks)
    model: Any  # the Linen module its config builds
    params: Any  # host numpy params, matching `model`
    config: Any  # the run's resolved config (ConfigDict)
    where: str  # the checkpoint path as the user gave it


def model_init(task, model, config):
    """`init(key) -> boxed params` on a batch of one, with every rng a task's model may ask for."""
    import jax

    inputs = task.model_inputs(task.example_batch(config, 1))

    def init(key):
        k = jax.random.split(key, 4)
        variables = model.init({"params": k[0], "mask": k[1], "dropout": k[2], "droppath": k[3]}, **inputs,
                               train=False)
        return variables["params"]

    return init


def load_run(ckpt: str | Path, tasks: Sequence[str] | None = None, require_config: bool = False) -> Run:
    """(task, model, params, config) of a workdir (best, else latest step), a step dir or a params export.

    `tasks`: the tasks the caller can use (CheckpointError naming them otherwise). The config must name its task
    (training writes it; `require_config` names a missing config.json); the params must have exactly the paths and
    shapes the config's model would init."""
    import flax.linen as nn
    import jax

    from cinema_jax.tasks import get_task
    from cinema_jax.train.checkpoint import check_params, load_params

    params, config = load_params(ckpt, require_config=require_config)
    wanted = " or ".join(repr(t) for t in tasks or ())
    name = str(get(config, "task", "") or "")  # optional: a converted import's config.json may have none
    if not name:
        raise CheckpointError(f"{ckpt}: no config.json naming the task next to the checkpoint; this command needs "
                              f"a {wanted or 'training'} run")
    if tasks and name not in tasks:
        raise CheckpointError(f"{ckpt}: checkpoint was trained for task {name!r}; this command needs {wanted}")
    task = get_task(name)
    try:
        task.configure(config)
        model = task.make_model(config)
        abstract = jax.eval_shape(model_init(task, model, config), jax.random.key(0))
    except Exception as err:  # noqa: BLE001 - a config the model factory rejects is a checkpoint problem here
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{ckpt}: its config does not build a model ({type(err).__name__}: {first})") from None
    params = params.get("params", params) if isinstance(params, dict) else params
    check_params(params, nn.meta.unbox(abstract), ckpt)
    return Run(task, model, params, config, str(ckpt))
