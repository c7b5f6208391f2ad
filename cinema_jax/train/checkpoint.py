"""Orbax checkpoints: the training CheckpointManager, params-only exports, and `load_params` for any run dir.

Layout (docs/design.md):
    <workdir>/config.json                 resolved config
    <workdir>/checkpoints/<step>/state    params, opt_state, step, rng (Orbax StandardSave, sharded arrays)
    <workdir>/checkpoints/<step>/data     Grain iterator state (one JSON per process)
    <workdir>/checkpoints/<step>/meta     loop bookkeeping (best metric, evals without improvement)
    <workdir>/best/params, best/config.json, best/metrics.json    best-by-validation params (save_params layout)
Why Orbax: async, multi-host, sharding-aware saves and restores onto a different mesh; params-only exports
(`save_params`) are what fine-tunes (`init_from`), `cinema-jax convert` and inference read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cinema_jax.config import from_plain, to_plain
from cinema_jax.errors import CheckpointError
from cinema_jax.fileutil import atomic_dir, write_text_atomic

CHECKPOINTS = "checkpoints"
BEST = "best"
PARAMS = "params"
CONFIG_JSON = "config.json"


# ------------------------------------------------------------------------------------------------ training manager
def make_manager(workdir: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """Async CheckpointManager keeping the latest `keep` steps (preservation policy, not the deprecated max_to_keep)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max(int(keep), 1)),
        enable_async_checkpointing=async_save,
        # Grain's iterator handler is a plain (sync) handler that writes process_<i>-of-<n>.json straight away; with
        # directories created asynchronously a non-primary process could write before process 0 had made the
        # temporary item directory (seen as a FileNotFoundError in a loaded 2-process run). Array writes stay async.
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
        create=True,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS, options=options)


def save_train(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    import grain

    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**args), force=True)


def restore_train(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restore (state onto the abstract state's shardings, data iterator in place) -> (state, meta)."""
    import grain

    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any mismatch is reported as one line
        raise CheckpointError(f"cannot resume from {manager.directory}/{step}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} (different config or model?)") from None
    return out["state"], dict(out["meta"] or {})


# ------------------------------------------------------------------------------------------------ params only
def _single_process_options() -> ocp.options.MultiprocessingOptions:
    """Let one process write (or read) on its own in a multi-process job (no cross-process barriers)."""
    pid = jax.process_index()
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    return ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid},
                                              barrier_sync_key_prefix=f"p{pid}")


def _to_numpy(tree: Any) -> Any:
    import flax.linen as nn

    tree = nn.meta.unbox(tree)
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def save_params(directory: str | Path, params: Any, config: Any, metrics: dict | None = None,
                overwrite: bool = True) -> Path:
    """Write `<directory>/params` (Orbax, numpy, unboxed) + `config.json` (+ `metrics.json`) atomically.

    Call from one process only (the loop uses process 0); `params` may be sharded arrays that are fully addressable
    on this process, or numpy.
    """
    directory = Path(directory).absolute()
    host = _to_numpy(params)
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=_single_process_options())
        try:
            ckptr.save(tmp / PARAMS, host)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        write_text_atomic(tmp / CONFIG_JSON, json.dumps(to_plain(config) if config is not None else {}, indent=1))
        if metrics is not None:
            write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=1))
    return directory


def _numpy_restore(path: Path, subtree: str | None = None) -> Any:
    """Restore an Orbax pytree (or one top-level subtree) as host numpy arrays, whatever mesh saved it."""
    mp = _single_process_options()
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp)
    try:
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        if subtree is not None:
            if subtree not in tree:
                raise CheckpointError(f"checkpoint {path} has no {subtree!r} entry")
            tree = {subtree: tree[subtree]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                              partial_restore=subtree is not None))
    finally:
        ckptr.close()
    return out[subtree] if subtree is not None else out


def _read_config(*candidates: Path):
    for c in candidates:
        if c.is_file():
            try:
                return from_plain(json.loads(c.read_text()))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"unreadable config {c}: {e}") from None
    return from_plain({})


def latest_step_dir(workdir: Path) -> Path | None:
    root = workdir / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    return root / str(steps[-1]) if steps else None


def resolve(path: str | Path) -> tuple[str, Path]:
    """-> ('params', dir holding params/) or ('state', a checkpoints/<step> dir).

    Accepts a workdir (best/ first, else the latest step), best/, a step dir or a params export."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / PARAMS).is_dir():
        return "params", path
    if (path / BEST / PARAMS).is_dir():
        return "params", path / BEST
    if (path / "state").is_dir():
        return "state", path
    step_dir = latest_step_dir(path)
    if step_dir is not None:
        return "state", step_dir
    raise CheckpointError(f"{path} holds no checkpoint (expected a workdir with best/ or checkpoints/<step>/, "
                          f"a checkpoints/<step> dir, or a params export with params/ and config.json)")


def load_params(path: str | Path) -> tuple[Any, Any]:
    """(unboxed numpy params, ConfigDict) from a workdir (best, else latest step), a step dir or a params export."""
    kind, where = resolve(path)
    try:
        if kind == "params":
            params = _numpy_restore(where / PARAMS)
            config = _read_config(where / CONFIG_JSON, where.parent / CONFIG_JSON)
        else:
            params = _numpy_restore(where / "state", "params")
            config = _read_config(where.parent.parent / CONFIG_JSON)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable / foreign directories
        raise CheckpointError(f"cannot read checkpoint {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return params, config
