"""Orbax checkpoints: the training CheckpointManager, params-only exports, and `load_params` for any run dir.

Layout (docs/design.md):
    <workdir>/config.json                 resolved config
    <workdir>/checkpoints/<step>/state    params, opt_state, step, rng (Orbax StandardSave, sharded arrays)
    <workdir>/checkpoints/<step>/data     Grain iterator state (one JSON per process)
    <workdir>/checkpoints/<step>/meta     loop bookkeeping (best metric, evals without improvement) and the state's
                                          per-tensor checksums (`train.integrity`), verified on every restore
    <workdir>/best/params, best/config.json, best/metrics.json, best/checksums.json    best-by-validation params
                                          (save_params layout)
Why Orbax: async, multi-host, sharding-aware saves and restores onto a different mesh; params-only exports
(`save_params`) are what fine-tunes (`init_from`), `cinema-jax convert` and inference read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cinema_jax.config import from_plain, to_plain
from cinema_jax.errors import CheckpointError
from cinema_jax.fileutil import atomic_dir, write_json_atomic, write_text_atomic
from cinema_jax.train import integrity

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
        cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp step dir: never restored, removed here
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS, options=options)


class CorruptState(CheckpointError):
    """A state about to be saved holds NaN/Inf params: saving it would crown a diverged run."""


def save_train(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Save the train state (+ Grain iterator + loop bookkeeping) at `step`, with the state's checksums in the meta.

    Refuses (CorruptState) a state whose floating-point values are not all finite: no checkpoint of a diverged run
    is ever written. All processes call it (the checksums are computed on the mesh)."""
    import grain

    sums, finite = integrity.device_checksums(state)
    if not finite:
        raise CorruptState(f"step {step}: the train state holds NaN/Inf values; not saving a checkpoint of it")
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave({**meta, "checksums": sums})}
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
        with _quiet_reads():
            out = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any mismatch is reported as one line
        # Orbax's first line often ends in ':' with the detail below it: keep the start of the whole text, joined
        detail = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointError(f"cannot resume from {manager.directory}/{step}: {type(e).__name__}: {detail} "
                              "(different config or model?)") from None
    meta = dict(out["meta"] or {})
    saved = meta.pop("checksums", None)
    if saved:  # checkpoints written before checksums existed restore unverified
        found, _ = integrity.device_checksums(out["state"])
        earlier = [s for s in manager.all_steps() if s < step]
        hint = (f"delete it to resume from step {max(earlier)}" if earlier
                else "delete it (no earlier checkpoint: the run restarts)")
        _verify(saved, found, Path(manager.directory) / str(step), hint=hint)
    return out["state"], meta


def _verify(saved: dict, found: dict, where: Path, prefix: str = "",
            hint: str = "use another checkpoint or re-create this one") -> None:
    bad = integrity.mismatches(saved, found, prefix)
    if bad:
        raise CheckpointError(f"checkpoint {where} is corrupt: {len(bad)} tensor(s) differ from the checksums saved "
                              f"with it (first: {prefix}{bad[0]}); {hint}")


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
                overwrite: bool = True, sources=()) -> Path:
    """Write `<directory>/params` (Orbax, numpy, unboxed) + `config.json` (+ `metrics.json`) + `checksums.json`
    atomically. `overwrite` replaces only an earlier params export (`fileutil.atomic_dir`); nothing is written in or
    around `sources`. Refuses NaN/Inf params (CorruptState).

    Call from one process only (the loop uses process 0); `params` may be sharded arrays that are fully addressable
    on this process, or numpy.
    """
    directory = Path(directory).absolute()
    host = _to_numpy(params)
    bad = [k for k, v in integrity._flat(host).items()
           if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CorruptState(f"{directory}: params hold NaN/Inf values ({bad[0]}); not saving them")
    sums = integrity.host_checksums(host)
    with atomic_dir(directory, overwrite=overwrite, sources=sources, kind="params") as tmp:
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=_single_process_options())
        try:
            ckptr.save(tmp / PARAMS, host)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        write_text_atomic(tmp / CONFIG_JSON, json.dumps(to_plain(config) if config is not None else {}, indent=1))
        write_json_atomic(tmp / integrity.CHECKSUMS, sums)
        if metrics is not None:
            write_json_atomic(tmp / "metrics.json", metrics)
    return directory


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its still-pending tasks finish before it closes.

    Orbax runs a restore in a fresh loop and closes it as soon as one read fails (`asyncio.gather` without
    `return_exceptions`); the other tensorstore reads then complete onto the closed loop and print "RuntimeError:
    Event loop is closed" tracebacks after the one-line error. Draining first keeps a failed restore quiet."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                done, _ = self.run_until_complete(asyncio.wait(pending, timeout=60))
                for t in done:  # retrieved: no "Task exception was never retrieved" log either
                    if not t.cancelled():
                        t.exception()
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _quiet_reads():
    """Orbax's event loops drain before closing (see `_DrainingLoop`); absl's warning that precedes a metadata
    failure is held back (the CheckpointError says it in one line)."""
    policy, absl = asyncio.get_event_loop_policy(), logging.getLogger("absl")
    level = absl.level
    asyncio.set_event_loop_policy(_DrainingPolicy())
    absl.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)
        absl.setLevel(level)


def _numpy_restore(path: Path, subtree: str | None = None) -> Any:
    """Restore an Orbax pytree (or one top-level subtree) as host numpy arrays, whatever mesh saved it."""
    mp = _single_process_options()
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp)
    with _quiet_reads(), contextlib.closing(ckptr):
        meta = ckptr.metadata(path)
        meta = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        tree = getattr(meta, "tree", None)
        if tree is None:  # e.g. _METADATA deleted: Orbax returns no tree rather than raising
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (no Orbax metadata)")
        if subtree is not None:
            if subtree not in tree:
                raise CheckpointError(f"checkpoint {path} has no {subtree!r} entry")
            tree = {subtree: tree[subtree]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                              partial_restore=subtree is not None))
    return out[subtree] if subtree is not None else out


def _read_config(*candidates: Path, required: bool = False):
    """The first existing candidate as a ConfigDict; an empty one when none exists (params are usable without it:
    `init_from`, `convert export`) unless `required`, which names the missing file."""
    for c in candidates:
        if c.is_file():
            try:
                data = json.loads(c.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"unreadable config {c}: {e}") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"config {c} is not a JSON object (holds a {type(data).__name__})")
            try:
                return from_plain(data)
            except Exception as e:  # noqa: BLE001 - keys/values ConfigDict refuses
                raise CheckpointError(f"unusable config {c}: {type(e).__name__}: {e}") from None
    if required:
        raise CheckpointError(f"config.json is missing: no {' or '.join(map(str, candidates))} (training writes the "
                              f"run's resolved config there)")
    return from_plain({})


def _shapes(tree: Any) -> dict[str, tuple]:
    from flax.traverse_util import flatten_dict

    tree = tree.get("params", tree) if isinstance(tree, dict) else tree
    return {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in flatten_dict(tree).items()}


def check_params(params: Any, abstract: Any, where: Any) -> None:
    """CheckpointError naming the first difference when `params` lack the paths/shapes of `abstract` (the params the
    config's model would init): one line instead of a flax scope error from deep inside `apply`."""
    have, want = _shapes(params), _shapes(abstract)
    if have == want:
        return
    missing = sorted(set(want) - set(have))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    detail = (f"missing {missing[0]}" if missing else f"{bad[0]}: {have[bad[0]]} vs {want[bad[0]]}" if bad
              else f"unexpected {sorted(set(have) - set(want))[0]}")
    what = "shape mismatch: " if bad and not missing else ""
    raise CheckpointError(f"{where}: {what}parameters do not match the model in its config ({detail})")


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


def load_config(path: str | Path, require_config: bool = False) -> Any:
    """The ConfigDict saved with a workdir (best, else latest step), a step dir or a params export, without reading
    any params; empty when there is none, unless `require_config`."""
    kind, where = resolve(path)
    if kind == "params":
        return _read_config(where / CONFIG_JSON, where.parent / CONFIG_JSON, required=require_config)
    return _read_config(where.parent.parent / CONFIG_JSON, required=require_config)


def load_params(path: str | Path, require_config: bool = False) -> tuple[Any, Any]:
    """(unboxed numpy params, ConfigDict) from a workdir (best, else latest step), a step dir or a params export.

    Without `require_config` a missing config.json gives an empty ConfigDict (the params alone are enough for
    `init_from` and exports)."""
    kind, where = resolve(path)
    config = load_config(path, require_config)
    try:
        params = _numpy_restore(where / PARAMS) if kind == "params" else _numpy_restore(where / "state", "params")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable / foreign directories
        raise CheckpointError(f"cannot read checkpoint {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    verify_params(params, where, kind)
    return params, config


def _saved_checksums(where: Path, kind: str) -> tuple[dict | None, str]:
    """(checksums saved with the checkpoint or None for one written before they existed, path prefix of params)."""
    path = where / integrity.CHECKSUMS if kind == "params" else where / "meta" / "metadata"
    if not path.is_file():
        return None, ""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {where}: unreadable {path.name} ({e})") from None
    if kind != "params":
        data = data.get("checksums") if isinstance(data, dict) else None
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {where}: {path.name} does not hold checksums")
    return data, "" if kind == "params" else "params/"


def verify_params(params: Any, where: Path, kind: str = "params") -> None:
    """CheckpointError naming the checkpoint when restored params differ from the checksums saved with them."""
    saved, prefix = _saved_checksums(Path(where), kind)
    if saved:
        _verify(saved, integrity.host_checksums(params), Path(where), prefix)
