"""The one training loop for every task: mesh, sharded init, jitted step, checkpoints, resume, logging, eval.

Why one loop: tasks (`cinema_jax/tasks/*`) only provide data, model, loss and metrics through the Task protocol;
everything that must be right once — sharding, optimizer, exact resume, logging cadence, early stopping, best
checkpoint — lives here. Determinism: the step's rng is `fold_in(key(seed), step)` and the data stream is a function
of (seed, global sample index) (see `cinema_jax.data.pipeline`), so a run killed and restarted from its last
checkpoint, a run on another mesh, or a run split over processes computes the same steps (up to float reassociation).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from cinema_jax.config import get, to_plain, validate_common
from cinema_jax.data import pipeline
from cinema_jax.errors import CinemaError, ConfigError
from cinema_jax.fileutil import clean_json, ensure_dir, write_json_atomic, write_text_atomic
from cinema_jax.tasks import get_task
from cinema_jax.train import checkpoint as ckpt
from cinema_jax.train import sharding as shd
from cinema_jax.train import workdir as run_dir
from cinema_jax.train.logging import MetricsWriter, progress_bar
from cinema_jax.train.preemption import Preempted, PreemptionWatch
from cinema_jax.train.prefetch import DevicePrefetch
from cinema_jax.train.restore import load_run, model_init
from cinema_jax.train.state import make_optimizer, new_state


# ------------------------------------------------------------------------------------------------ multi-host
def maybe_initialize_distributed(config=None) -> None:
    """`jax.distributed.initialize` when the environment or `config.distributed` asks for it.

    Explicit: CINEMA_COORDINATOR (host:port), CINEMA_NUM_PROCESSES, CINEMA_PROCESS_ID (or config.distributed.*).
    Automatic (JAX detects the cluster): CINEMA_DISTRIBUTED=auto, `config.distributed.auto`, or a SLURM job with
    more than one task. Single-host runs do nothing.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    dist = {}
    if config is not None and "distributed" in config:
        dist = to_plain(config.distributed) or {}
    addr = env.get("CINEMA_COORDINATOR") or dist.get("coordinator_address") or ""
    if addr:
        n = int(env.get("CINEMA_NUM_PROCESSES") or dist.get("num_processes") or 0)
        pid = int(env.get("CINEMA_PROCESS_ID") or dist.get("process_id") or 0)
        if n < 1:
            raise ConfigError("distributed run: CINEMA_NUM_PROCESSES / distributed.num_processes must be >= 1")
        if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
        return
    auto = env.get("CINEMA_DISTRIBUTED", "").lower() == "auto" or bool(dist.get("auto", False))
    if auto or int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        jax.distributed.initialize()


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (all processes must call it in a multi-process job)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _put_global(tree: Any, shardings: Any) -> Any:
    """Host numpy (identical on all processes) -> global arrays with the given shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]), tree, shardings)


def _local_mesh_context():
    """A 1-device mesh for host-side eval/visualisation in multi-process runs (global arrays are not involved)."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    return jax.set_mesh(mesh)


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


@contextmanager
def _building(what: str):
    """A ValueError/TypeError while building `what` from the config (a model size the factory refuses, a mask ratio
    out of range, an image size the patches do not tile) is a config problem: ConfigError with the original message.
    Only the build is wrapped; errors raised while training stay ordinary exceptions. The data pipeline reads files
    too, so its message blames neither side (the data sources raise DataError themselves for the cases they know)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        cause = (f"the {what} could not be built from the config and the data it names" if what == "data pipeline"
                 else f"the config does not build the {what}")
        raise ConfigError(f"{cause}: {type(e).__name__}: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------------ setup
class Setup:
    """Everything `train`, `bench` and the tests need: task, model, mesh, shardings, optimizer, jitted step.

    Planned before anything is allocated (big_vision's `train.py`): the constructor works out param shapes with
    `jax.eval_shape`, their shardings from the logical-axis rules, the optimizer and its state's shapes and
    shardings, i.e. `abstract_state`. `make_step` (and compiling it, e.g. for memory analysis) needs only that plan;
    `init_state` allocates the state directly onto its shardings."""

    def __init__(self, config, mesh=None):
        self.config = config
        with _building("model"):
            self.task = get_task(config.task).configure(config)
            self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
            self.grad_accum = int(get(config, "grad_accum"))
            shd.check_batch_divisible(int(config.batch_size), self.mesh, self.grad_accum)
            self.model = self.task.make_model(config)
        self.rules = shd.LOGICAL_RULES
        self.batch_sharding = shd.batch_sharding(self.mesh)
        self.rep = shd.replicated(self.mesh)
        self.init_key, self.train_key = jax.random.split(jax.random.key(int(config.seed)))
        with _building("initial state"), self.context():
            self._plan()

    def context(self):
        """Mesh + logical-axis rules context (activation constraints in the models resolve against it)."""
        stack = ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _plan(self) -> None:
        """Shapes -> shardings -> optimizer -> abstract state, from `jax.eval_shape` only (no memory)."""
        self._init = model_init(self.task, self.model, self.config)
        boxed = jax.eval_shape(self._init, self.init_key)
        self.param_shardings = shd.param_shardings(boxed, self.mesh, self.rules)
        self.abstract_params = shd.strip_boxes(boxed)
        self.tx, self.schedule = make_optimizer(self.config, self.abstract_params)
        self.opt_shardings = shd.opt_state_shardings(self.tx, self.abstract_params, self.param_shardings, self.mesh)
        self.state_shardings = {"step": self.rep, "params": self.param_shardings, "opt_state": self.opt_shardings,
                                "rng": self.rep}
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": self.abstract_params,
                  "opt_state": jax.eval_shape(self.tx.init, self.abstract_params),
                  "rng": jax.eval_shape(jax.random.key_data, self.train_key)}
        self.abstract_state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings)

    def init_state(self) -> dict:
        """Sharded train state at step 0 (params from init or `config.init_from`'s encoder), allocated directly
        onto the planned shardings."""
        init = self._init
        params = jax.jit(lambda k: shd.strip_boxes(init(k)), out_shardings=self.param_shardings)(self.init_key)
        init_from = str(get(self.config, "init_from"))
        if init_from:
            from cinema_jax.models.transfer import load_encoder

            pretrained, _ = ckpt.load_params(init_from)
            host = load_encoder(pretrained, to_host(params))
            params = _put_global(host, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.key_data(self.train_key)),
                            out_shardings=(self.rep, self.rep))()
        return new_state(params, opt_state, rng) | {"step": step}

    def make_step(self):
        task, model, tx, schedule, accum = self.task, self.model, self.tx, self.schedule, self.grad_accum

        def loss_fn(params, batch, key):
            loss, aux = task.loss(model, params, batch, key, True)
            return loss, aux

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step_fn(state, batch):
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            params = state["params"]
            if accum == 1:
                (loss, aux), grads = grad_fn(params, batch, key)
            else:
                # micro-batch j = rows j, j + accum, ...: every device keeps its own rows (no data movement)
                micro = jax.tree_util.tree_map(
                    lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), batch)
                micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(
                    self.mesh, P(None, shd.BATCH_AXES)))
                first = jax.tree_util.tree_map(lambda x: x[0], micro)
                shapes = jax.eval_shape(grad_fn, params, first, key)
                zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

                def body(carry, xs):
                    mb, i = xs
                    out = grad_fn(params, mb, jax.random.fold_in(key, i))
                    return jax.tree_util.tree_map(jnp.add, carry, out), None

                total, _ = jax.lax.scan(body, zero, (micro, jnp.arange(accum)))
                (loss, aux), grads = jax.tree_util.tree_map(lambda x: x / accum, total)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            # a non-finite loss or gradient never reaches the params or the optimizer state: the step is a no-op and
            # the loop stops (or skips, if configured) when it reads the flag
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()}
            metrics.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm,
                           lr=jnp.asarray(schedule(state["step"]), jnp.float32),
                           nonfinite=1.0 - finite.astype(jnp.float32))
            new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
            return new, metrics

        return jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, self.rep), donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------ eval helpers
def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """An undefined (NaN) or infinite metric never selects `best/`."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _eval_params(state_params):
    """Params to hand to task.evaluate/visualize: the sharded arrays (one process) or a host copy."""
    if jax.process_count() == 1:
        return state_params, nullcontext()
    return to_host(state_params), _local_mesh_context()


def run_eval(setup: Setup, params, split: str = "val") -> dict[str, float]:
    batches = pipeline.eval_batches(setup.task, setup.config, split)
    metrics = setup.task.evaluate(setup.model, params, batches, setup.config)
    return {k: float(v) for k, v in dict(metrics or {}).items()}


# ------------------------------------------------------------------------------------------------ train
NONFINITE_ACTIONS = ("stop", "skip")
MAX_SKIPS_IN_A_ROW = 10  # `on_nonfinite=skip` passes over a transient spike; a run that stays non-finite still stops


class TrainingDiverged(CinemaError):
    """A non-finite loss or gradient norm (`on_nonfinite=stop`, or too many skips in a row)."""


def _check_workdir(workdir: Path, config) -> None:
    """Claim `workdir` as a run (`train.workdir.claim`: an ordinary non-empty folder is refused); refuse one that
    holds checkpoints of another task (resuming would fail, and a config.json rewritten for the new task would make
    the old run's params unusable for `eval`/`infer`)."""
    run_dir.claim(workdir)
    if ckpt.latest_step_dir(workdir) is None and not (workdir / ckpt.BEST / ckpt.PARAMS).is_dir():
        return
    try:
        old = json.loads((workdir / ckpt.CONFIG_JSON).read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return  # no readable config.json: the restore decides (config.json is only rewritten after it succeeds)
    new = config.get("task")
    if old is not None and old != new:
        raise ConfigError(f"{workdir} holds a {old!r} run; task {new!r} cannot resume it (use another --workdir)")


def _own_run(workdir: Path, config, cleanup: ExitStack) -> None:
    """Process 0: claim the run, hold its lock until exit, remove what killed atomic writes left behind, and adopt
    a `best/` written before output markers existed (the loop replaces it, so it must be recognisably ours)."""
    from cinema_jax.fileutil import read_marker, write_marker

    ensure_dir(workdir)
    lock = run_dir.RunLock(workdir).acquire()  # before reading anything: a live writer may be changing it
    cleanup.callback(lock.release)
    if lock.took_over:
        print(f"note: took over the stale lock of {lock.took_over} (that process is gone)", flush=True)
    _check_workdir(workdir, config)
    run_dir.clean_leftovers(workdir)
    best = workdir / ckpt.BEST
    if best.is_dir() and read_marker(best) is None and (best / ckpt.PARAMS).is_dir():
        write_marker(best, "params", [p.name for p in best.iterdir()])


class _Guard:
    """Reads each step's non-finite flag one step late (no host sync per step) or at once before the loop acts on
    the step (eval, checkpoint); stops the run or counts skips (`on_nonfinite`)."""

    def __init__(self, action: str, meta: dict, workdir: Path):
        if action not in NONFINITE_ACTIONS:
            raise ConfigError(f"config key 'on_nonfinite' must be stop or skip, got {action!r}")
        self.action, self.meta, self.workdir = action, meta, workdir
        self.pending: tuple[int, Any] | None = None
        self.in_a_row = 0

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        if float(metrics["nonfinite"]) == 0.0:
            self.in_a_row = 0
            return
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        self.in_a_row += 1
        self.meta["nonfinite_skips"] = int(self.meta.get("nonfinite_skips", 0)) + 1
        what = f"non-finite loss ({loss:g}) or gradient norm ({gnorm:g}) at step {step}"
        if self.action == "stop" or self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            why = "" if self.action == "stop" else f" ({self.in_a_row} steps in a row skipped)"
            last = ckpt.latest_step_dir(self.workdir)
            raise TrainingDiverged(
                f"training diverged: {what}{why}; the update was not applied and no checkpoint holds it (latest: "
                f"{last.name if last else 'none'}); lower optim.lr or raise optim.warmup_steps, or set "
                f"--config.on_nonfinite=skip to skip such steps")


def train(config, workdir: str | os.PathLike) -> dict:
    """Train `config.task` into `workdir`; re-running on the same workdir resumes from the latest checkpoint.

    Returns a summary dict (last step, last logged metrics, best eval metric). Raises `TrainingDiverged` on a
    non-finite loss (nothing non-finite is ever saved) and `Preempted` after SIGTERM, once the checkpoint of the
    step in flight has committed.
    """
    validate_common(config)  # library callers too, not only `load_config`
    maybe_initialize_distributed(config)
    workdir = Path(workdir).absolute()
    main = jax.process_index() == 0
    # everything opened below is closed on any exit (a TensorBoard writer left open prints an atexit traceback)
    with ExitStack() as cleanup:
        if main:
            _own_run(workdir, config, cleanup)
        setup = Setup(config)  # ConfigError for a config that builds no model / state (`_building`)
        cleanup.enter_context(setup.context())
        return _train(setup, config, workdir, main, cleanup)


def _train(setup: Setup, config, workdir: Path, main: bool, cleanup: ExitStack) -> dict:
    task = setup.task
    total = int(config.total_steps)
    log_every = int(get(config, "log_every"))
    ckpt_every = int(get(config, "checkpoint_every"))
    eval_every = int(get(config, "eval_every"))
    image_every = int(get(config, "image_every"))
    es = to_plain(get(config, "early_stopping")) or {}
    es_metric = es.get("metric") or task.eval_metric
    es_mode = es.get("mode") or task.eval_mode
    patience = int(es.get("patience", 0) or 0)
    min_delta = float(es.get("min_delta", 0.0) or 0.0)
    on_nonfinite = str(get(config, "on_nonfinite"))

    with _building("initial state"):
        state = setup.init_state()
    train_step = setup.make_step()
    block, n_blocks = shd.process_batch_block(int(config.batch_size), setup.batch_sharding)
    # batches are sharded onto the mesh `device_prefetch` steps ahead; the checkpointed Grain state stays that of
    # the next batch the step will consume (train/prefetch.py)
    with _building("data pipeline"):
        data_iter = DevicePrefetch(pipeline.train_iterator(task, config, block, n_blocks),
                                   lambda b: shd.shard_batch(b, setup.batch_sharding),
                                   int(get(config, "data.device_prefetch")))
    cleanup.callback(data_iter.close)
    manager = ckpt.make_manager(workdir, int(get(config, "keep_checkpoints")))
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)
    meta = {"best": None, "bad_evals": 0, "stopped": False}
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state, meta = ckpt.restore_train(manager, latest, setup.abstract_state, data_iter)
        start = int(latest)
    if main:  # only now: a failed restore leaves the run's config.json as it was
        write_text_atomic(workdir / ckpt.CONFIG_JSON, json.dumps(to_plain(config), indent=1))
    writer = MetricsWriter(workdir, active=main, resume_step=start)
    cleanup.callback(writer.close)
    vis_batch = None
    if image_every and main:
        # the first eval batch (same shapes as eval: the task's jitted forward is reused, no extra compile)
        vis_batch = next(iter(pipeline.eval_batches(task, config, "val")), None)
    images_per_sample = int(task.images_per_sample(config))
    bar = progress_bar(total, start, main)
    cleanup.callback(bar.close)
    guard = _Guard(on_nonfinite, meta, workdir)
    preemption = cleanup.enter_context(PreemptionWatch(jax.process_count() > 1))
    step = start
    last: dict[str, Any] = {}
    t_last, n_since, wait = time.perf_counter(), 0, 0.0
    stopped = bool(meta.get("stopped", False))
    while step < total and not stopped:
        t_wait = time.perf_counter()
        batch = next(data_iter)  # host pipeline + device copy; the step itself is dispatched asynchronously
        wait += time.perf_counter() - t_wait
        state, metrics = train_step(state, batch)
        step += 1
        n_since += 1
        bar.update(1)
        guard.push(step, metrics)  # checks the previous step's flag: this step is already queued behind it
        if log_every and (step % log_every == 0 or step == total):
            guard.flush()
            values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
            now = time.perf_counter()
            dt = max(now - t_last, 1e-9)
            values["steps_per_s"] = n_since / dt
            values["images_per_s"] = n_since * int(config.batch_size) * images_per_sample / dt
            # share of wall time spent waiting for input: near 0 means the step, not data, sets the pace
            values["data_wait_frac"] = min(wait / dt, 1.0)
            if on_nonfinite == "skip":
                values["nonfinite_skips"] = int(meta.get("nonfinite_skips", 0))
            t_last, n_since, wait = now, 0, 0.0
            writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.4g}", lr=f"{values['lr']:.2e}")
            last = values
        t_pause = time.perf_counter()  # eval, pictures and checkpoints are left out of the throughput window
        if eval_every and (step % eval_every == 0 or step == total):
            guard.flush()
            params, ctx = _eval_params(state["params"])
            with ctx:
                ev = run_eval(setup, params)
            if ev:
                writer.write(step, ev, prefix="eval/")
                value = ev.get(es_metric)
                if value is not None and _better(value, meta.get("best"), es_mode, min_delta):
                    meta["best"], meta["bad_evals"] = float(value), 0
                    if main:
                        ckpt.save_params(workdir / ckpt.BEST, params, config,
                                         metrics={"step": step, **ev})
                elif value is not None:
                    meta["bad_evals"] = int(meta.get("bad_evals", 0)) + 1
                    if patience and meta["bad_evals"] >= patience:
                        stopped = meta["stopped"] = True
        if image_every and step % image_every == 0:
            params, ctx = _eval_params(state["params"])
            if main and vis_batch is not None:
                with ctx:
                    task.visualize(setup.model, params, vis_batch, jax.random.key(0),
                                   workdir / "images" / f"step_{step:07d}.png")
        preempted = preemption.reached(step, manager)
        if (ckpt_every and step % ckpt_every == 0) or step == total or stopped or preempted:
            guard.flush()
            ckpt.save_train(manager, step, state, data_iter, dict(meta))
        if preempted:
            manager.wait_until_finished()  # committed before we say so
            raise Preempted(step, str(workdir / ckpt.CHECKPOINTS))
        t_last += time.perf_counter() - t_pause
    guard.flush()
    return {"step": step, "last": last, "best": meta.get("best"), "stopped": stopped}


def evaluate_workdir(workdir: str | os.PathLike, split: str = "val") -> dict[str, float]:
    """Evaluate a run's best (else latest) params on `split`; writes `<workdir>/eval_<split>.json`."""
    workdir = Path(workdir).absolute()
    run = load_run(workdir, require_config=True)
    metrics = run.task.evaluate(run.model, run.params, pipeline.eval_batches(run.task, run.config, split), run.config)
    metrics = {k: float(v) for k, v in dict(metrics or {}).items()}
    write_json_atomic(workdir / f"eval_{split}.json", {"split": split, **metrics})
    print(json.dumps(clean_json({"split": split, **metrics})))
    return metrics
