"""Benchmark harness: `python -m cinema_jax.bench --config=configs/bench.py:NAME [--config.key=value ...]`.

Prints ONE JSON line. Modes (`config.mode`, set by the NAME in configs/bench.py):

train_step       the training loop's own jitted, sharded step (`cinema_jax.train.loop.Setup.make_step`: loss + grads +
                 clipping + AdamW + schedule, state donated) for the task config `config.train`, on a random batch
                 of the task's example-batch shapes. Reports step time (median of
                 `timed_steps` >= 5 steps after compilation and `warmup_steps` untimed steps, each ended by
                 `block_until_ready`), samples/s, XLA cost-analysis FLOPs, the measured matmul peak in the same
                 dtype on the same devices, peak_fraction = achieved / peak, compiled memory analysis, and the
                 collectives (op counts and bytes) of the compiled HLO.
synth_data       phantom generator samples/s per worker (one Grain map worker = this process): one MAE pretraining
                 sample = the four views of one frame at the configured sizes.
record_data      the same MAE sample read from a pre-rendered ArrayRecord dataset (cine records: every frame of
                 every view, uint8; `data.frame_records`: one record per frame in a companion file, else one npz
                 member per frame inside the subject's record) written to a temporary directory first: read +
                 decode one frame of each view + zoom + scaling, and the read + decode alone.
noise_pipeline   SNRAware training samples/s per worker: phantom render of a complex slice + SNR-unit noise
                 synthesis + crop (`cinema_jax.tasks.denoise` transform), and the noise synthesis alone.
memory_fit       per-device compiled memory (XLA buffer assignment, no allocation: abstract inputs) of the MAE train
                 step under FSDP over `memory.fsdp` devices, for each size in `memory.sizes` and a batch-per-device
                 search against `memory.budget_bytes`.
scaling          weak / strong scaling: re-runs `train_step` in child processes with 1/2/4/8 simulated CPU devices
                 (XLA_FLAGS=--xla_force_host_platform_device_count=n), and over 2 local processes joined by
                 jax.distributed on 127.0.0.1 (gloo CPU collectives), collecting their JSON lines.

Conventions. FLOPs are XLA's cost analysis of the compiled (SPMD-partitioned, per-device) step, multiplied by the
device count: a multiply-add counts 2 FLOPs (checked: a 128x256 @ 256x64 dot reports 2*128*256*64), and everything
the step executes (forward, backward, remat recompute, optimizer) is counted, so this is "hardware FLOPs", not
analytic model FLOPs. The peak is measured, not quoted: a batched square matmul sharded over the same devices in the
same dtype, so peak_fraction is relative to what this machine's XLA achieves on its best-case kernel.
Communication: every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute in the compiled HLO
is counted with its result bytes; with more than one device, an isolated all-reduce of the same total bytes is timed
(`collective_probe_s`) as the communication estimate and `compute_s_est = step_time_s - collective_probe_s`.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cinema_jax.errors import ConfigError

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
ENV_COORD = "CINEMA_BENCH_COORDINATOR"
ENV_NPROC = "CINEMA_BENCH_NUM_PROCESSES"
ENV_PID = "CINEMA_BENCH_PROCESS_ID"


# ================================================================================================ HLO / compile stats
def hlo_collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
    """{op: {'count', 'bytes', 'shapes'}} for the collectives in an HLO module text (result shapes per device).

    Combined collectives (one op over a tuple of buffers) count once and contribute every buffer's shape; for async
    `*-start` ops of all-gather / collective-permute the result tuple holds (operands, outputs), so only the second
    half is counted; `*-done` ops are skipped (they repeat the start's buffers)."""
    out: dict[str, dict[str, Any]] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_RE.match(line)
        if not m:
            continue
        result_type, op, start = m.group(1), m.group(2), m.group(3)
        shapes = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE_RE.findall(result_type)]
        if start and op in ("all-gather", "collective-permute") and len(shapes) >= 2:
            shapes = shapes[len(shapes) // 2:]
        entry = out.setdefault(op, {"count": 0, "bytes": 0, "shapes": []})
        entry["count"] += 1
        for dt, dims in shapes:
            entry["bytes"] += _DTYPE_BYTES[dt] * math.prod(dims)
            entry["shapes"].append(dims)
    return out


def cost_flops(compiled) -> tuple[float | None, float | None]:
    """(flops, bytes accessed) of a compiled executable's cost analysis; None where the backend gives none.

    The structure is backend-defined (a dict, or a list of per-module dicts in older jaxlib), so it is guarded."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning nothing
        return None, None
    if ca is None:
        return None, None
    entries = ca if isinstance(ca, (list, tuple)) else [ca]
    flops = bytes_ = 0.0
    seen = False
    for e in entries:
        if not isinstance(e, dict):
            continue
        if "flops" in e:
            flops += float(e["flops"])
            seen = True
        bytes_ += float(e.get("bytes accessed", 0.0))
    return (flops if seen else None), (bytes_ or None)


def memory_report(compiled) -> dict[str, Any]:
    """Per-device compiled memory (XLA buffer assignment): arguments, outputs, temporaries, aliasing, peak."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        ma = None
    if ma is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    rep = {k: int(getattr(ma, k)) for k in keys if getattr(ma, k, None) is not None}
    est = (rep.get("argument_size_in_bytes", 0) + rep.get("output_size_in_bytes", 0)
           + rep.get("temp_size_in_bytes", 0) - rep.get("alias_size_in_bytes", 0))
    rep["live_estimate_bytes"] = int(est)
    rep["peak_bytes"] = int(max(rep.get("peak_memory_in_bytes", 0) or 0, est))
    return rep


def device_memory_peak(devices) -> int | None:
    """Largest `peak_bytes_in_use` over the devices' allocator stats (None on backends without stats, e.g. CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def host_malloc() -> str:
    """The malloc this process runs on ('tcmalloc', 'jemalloc', 'mimalloc' or 'glibc'), from its mapped libraries.

    Why it is reported: XLA:CPU allocates its temp buffer afresh every step, and under glibc's malloc each step
    faults all of it in again; an LD_PRELOADed tcmalloc keeps the pages, which cut MAE-base step times here by
    18-30 % (README "Performance"). Figures are only comparable under the same allocator."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if re.search(rf"/lib{name}[\w.-]*\.so", maps):
            return name
    return "glibc"


def device_info(devices) -> dict[str, Any]:
    import jax

    d0 = devices[0]
    return {"platform": d0.platform, "kind": d0.device_kind, "count": len(devices),
            "process_count": jax.process_count(), "host_cpus": os.cpu_count(), "host_malloc": host_malloc()}


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    import jax

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _jnp_dtype(precision: str):
    import jax.numpy as jnp

    return jnp.bfloat16 if precision == "bfloat16" else jnp.float32


def matmul_peak(devices, dtype_name: str, n: int, reps: int = 5) -> dict[str, float]:
    """Measured FLOP/s of a batched (one per device) n x n @ n x n matmul sharded over `devices`, float32 output.

    The fastest of `reps` calls, not the median: a peak is what the hardware can do, and on a shared or throttling
    host the median drifts by +-20 % between runs, which would inflate or deflate every peak_fraction with it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    dtype = _jnp_dtype(dtype_name)
    k = len(devices)
    mesh = Mesh(np.asarray(devices), ("d",))
    sh = NamedSharding(mesh, P("d"))
    make = jax.jit(lambda key: jax.random.normal(key, (k, n, n), jnp.float32).astype(dtype), out_shardings=sh)
    a, b = make(jax.random.key(1)), make(jax.random.key(2))
    f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=jnp.float32),
                in_shardings=(sh, sh), out_shardings=sh)
    compiled = f.lower(a, b).compile()
    jax.block_until_ready(compiled(a, b))
    _, times = _median_time(lambda: compiled(a, b), max(3, reps))
    t = min(times)
    flops = 2.0 * k * n ** 3
    return {"matmul_peak_flops_per_s": flops / t, "matmul_n": n, "matmul_time_s": t}


def collective_probe(devices, n_bytes: int, reps: int = 5) -> float | None:
    """Median time of an isolated all-reduce (psum over all `devices`) of `n_bytes` float32 bytes per device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    k = len(devices)
    if k < 2 or n_bytes <= 0 or jax.process_count() > 1 and len(jax.local_devices()) != k // jax.process_count():
        return None
    mesh = Mesh(np.asarray(devices), ("d",))
    sh = NamedSharding(mesh, P("d"))
    n = max(1, int(n_bytes) // 4)
    x = jax.jit(lambda: jnp.ones((k, n), jnp.float32), out_shardings=sh)()
    f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    jax.block_until_ready(f(x))
    t, _ = _median_time(lambda: f(x), max(3, reps))
    return t


# ================================================================================================ workloads
def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def train_config(config, batch_size: int | None = None):
    """The task config under test (`config.train`) with the bench's batch / precision / remat / mesh applied."""
    import copy

    tc = copy.deepcopy(config.train)
    with tc.unlocked() if hasattr(tc, "unlocked") else _nullcontext():
        tc.batch_size = int(batch_size if batch_size is not None else config.batch_size)
        tc.precision = str(config.precision)
        tc.remat = str(config.remat)
        if "attention" in tc:
            tc.attention = str(config.attention)
        if "conv" in tc:
            tc.conv = str(config.conv)
        tc.grad_accum = int(config.grad_accum)
        tc.seed = int(config.seed)
        tc.mesh = copy.deepcopy(config.mesh)
        tc.init_from = ""
    return tc


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _batch_spec(task, tc, batch_size: int) -> dict:
    """Shapes and dtypes of the task's batch (float32 / int32), from a one-sample example: nothing of batch size is
    allocated, so compile-only runs (memory_fit) cost no host memory."""
    import numpy as np

    out = {}
    for k, v in task.example_batch(tc, 1).items():
        v = np.asarray(v)
        dt = np.float32 if v.dtype in (np.float64, np.float32) else (np.int32 if v.dtype == np.int64 else v.dtype)
        out[k] = ((batch_size,) + v.shape[1:], np.dtype(dt), v)
    return out


def _host_batch(spec: dict, seed: int) -> dict:
    """The batch of `spec` with random floats (uniform [0, 1)); integer fields keep the example's values."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for k, (shape, dtype, example) in spec.items():
        if dtype == np.float32:
            out[k] = rng.random(shape, dtype=np.float32)
        else:
            out[k] = np.broadcast_to(example.astype(dtype), shape).copy()
    return out


class TrainStep:
    """The training loop's own jitted step (`cinema_jax.train.loop.Setup.make_step`: loss + grads + clip + AdamW
    + lr schedule, state donated) for `config.train`, with abstract (compile-only) and concrete state."""

    def __init__(self, config, devices, batch_size: int):
        from cinema_jax.train import sharding as shd
        from cinema_jax.train.loop import Setup

        self.config = config
        self.devices = list(devices)
        self.batch_size = batch_size
        self.tc = train_config(config, batch_size)
        self.mesh = shd.make_mesh(self.tc.mesh, self.devices)
        self.setup = Setup(self.tc, self.mesh)
        self.model = self.setup.model
        self.batch_spec = _batch_spec(self.setup.task, self.tc, batch_size)
        self._abstract_init()
        self.jitted = self.setup.make_step()

    def _abstract_init(self) -> None:
        """What `Setup.init_state` sets up, from shapes only (no parameter is allocated): shardings + optimizer."""
        import jax
        import jax.numpy as jnp

        from cinema_jax.train import sharding as shd
        from cinema_jax.train.state import make_optimizer

        s = self.setup
        key = jax.random.key(int(self.tc.seed))
        with s.context():
            boxed = jax.eval_shape(s._init_fn(), key)
        s.param_shardings = shd.param_shardings(boxed, self.mesh, s.rules)
        s.abstract_params = shd.strip_boxes(boxed)
        s.tx, s.schedule = make_optimizer(self.tc, s.abstract_params)
        s.opt_shardings = shd.opt_state_shardings(s.tx, s.abstract_params, s.param_shardings, self.mesh)
        s.state_shardings = {"step": s.rep, "params": s.param_shardings, "opt_state": s.opt_shardings,
                             "rng": s.rep}
        rng = jax.eval_shape(lambda: jax.random.key_data(key))
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": s.abstract_params,
                 "opt_state": jax.eval_shape(s.tx.init, s.abstract_params), "rng": rng}
        self.abstract_state = jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, s.state_shardings)
        self.abstract_params = s.abstract_params
        self.param_sharding = s.param_shardings

    def abstract_args(self):
        import jax

        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.setup.batch_sharding)
                 for k, (shape, dtype, _) in self.batch_spec.items()}
        return self.abstract_state, batch

    def compile(self):
        t0 = time.perf_counter()
        with self.setup.context():
            compiled = self.jitted.lower(*self.abstract_args()).compile()
        return compiled, time.perf_counter() - t0

    def concrete_args(self):
        import jax
        import numpy as np

        from cinema_jax.train.sharding import shard_batch

        with self.setup.context():
            state = self.setup.init_state()
        n_proc, pid = jax.process_count(), jax.process_index()
        per = self.batch_size // n_proc
        batch = _host_batch(self.batch_spec, int(self.config.seed))
        local = {k: np.asarray(v[pid * per:(pid + 1) * per]) for k, v in batch.items()}
        return state, shard_batch(local, self.setup.batch_sharding)


def run_train_step(config) -> dict[str, Any]:
    import jax

    from cinema_jax.models.layers import resolve_conv_impl

    devices = _devices(config)
    if int(config.timed_steps) < 1:
        raise ConfigError("bench: timed_steps must be >= 1")
    bs = int(config.batch_size)
    ts = TrainStep(config, devices, bs)
    peak_args = (devices, config.precision, int(config.matmul_size), int(config.matmul_reps))
    peak_before = matmul_peak(*peak_args)  # before and after the steps; the higher one (conservative fraction)
    compiled, compile_s = ts.compile()
    flops_dev, bytes_dev = cost_flops(compiled)
    mem = memory_report(compiled)
    state, batch = ts.concrete_args()
    for _ in range(max(0, int(config.warmup_steps))):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    times, losses = [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(int(config.timed_steps)):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    profile = None
    profiled = bool(str(config.get("profile_dir", "") or ""))
    hlo_text = compiled.as_text() if (profiled or config.hlo_stats) else ""  # printed once: it is tens of MB
    if profiled:  # one more step, traced (not among the timed ones)
        from cinema_jax.step_profile import profile_step

        traced = profile_step(compiled, (state, batch), config.profile_dir, hlo_text, int(config.profile_depth))
        state, metrics = traced["outputs"]
        profile = traced["summary"]
    step_s = statistics.median(times)
    n = len(devices)
    flops = flops_dev * n if flops_dev is not None else None
    peak = max(peak_before, matmul_peak(*peak_args), key=lambda p: p["matmul_peak_flops_per_s"])
    achieved = flops / step_s if flops else None
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(ts.abstract_params))
    out = {
        "name": config.name, "mode": "train_step", "task": ts.tc.task,
        "model": _plain(ts.tc.model), "input_shapes": {k: list(v[0]) for k, v in ts.batch_spec.items()},
        "device": device_info(devices), "batch_size": bs, "precision": config.precision, "remat": config.remat,
        "attention": ts.tc.get("attention"),  # None for tasks without the option (the denoiser)
        "conv": resolve_conv_impl(ts.tc.conv) if "conv" in ts.tc else None,  # 'auto' resolved for this backend
        "mesh": dict(zip(ts.mesh.axis_names, (int(s) for s in ts.mesh.devices.shape))),
        "n_params": int(n_params),
        "step_time_s": step_s, "step_times_s": times, "samples_per_s": bs / step_s,
        "samples_per_s_per_device": bs / step_s / n,
        # this process's CPU time per timed step: on a CPU backend, sys time is mostly page faults on fresh buffers
        "host_cpu_s_per_step": {"user": (ru1.ru_utime - ru0.ru_utime) / len(times),
                                "sys": (ru1.ru_stime - ru0.ru_stime) / len(times)},
        "flops_per_step": flops, "flops_per_step_per_device": flops_dev,
        "bytes_accessed_per_step_per_device": bytes_dev,
        "achieved_flops_per_s": achieved,
        **peak,
        "peak_fraction": (achieved / peak["matmul_peak_flops_per_s"]) if achieved else None,
        "compile_time_s": compile_s,
        "peak_memory_bytes": device_memory_peak(devices) or mem.get("peak_bytes"),
        "peak_memory_source": "device.memory_stats" if device_memory_peak(devices) else "compiled.memory_analysis",
        "compiled_memory": mem,
        "loss_first": losses[0], "loss_last": losses[-1],
        "flop_convention": "XLA cost_analysis of the compiled step x devices; multiply-add = 2 FLOPs",
    }
    if profile is not None:
        out["profile"] = profile
    if config.hlo_stats:
        coll = hlo_collectives(hlo_text)
        out["collectives"] = {op: {"count": v["count"], "bytes": v["bytes"]} for op, v in coll.items()}
        total = sum(v["bytes"] for v in coll.values())
        out["collective_bytes_per_device"] = total
        probe = collective_probe(devices, total) if (config.collective_probe and total) else None
        out["collective_probe_s"] = probe
        out["compute_s_est"] = (step_s - probe) if probe is not None else step_s
    return out


def _devices(config):
    import jax

    devs = jax.devices()
    n = int(config.n_devices)
    if n > len(devs):
        raise ConfigError(f"bench: n_devices={n} but only {len(devs)} devices are visible "
                          "(simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return devs[:n] if n > 0 else devs


# ================================================================================================ data benchmarks
def _rate(fn, n: int, warmup: int) -> tuple[float, float]:
    """(samples/s, seconds/sample) of calling fn(i) for i in range(warmup, warmup + n) after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + n):
        fn(i)
    dt = time.perf_counter() - t0
    return n / dt, dt / n


def _grain_rate(transform, n: int, warmup: int, seed: int) -> float:
    """samples/s of a Grain MapDataset random_map pipeline consumed in this process (one worker)."""
    import grain
    import numpy as np

    ds = grain.MapDataset.range(warmup + n).random_map(lambda i, rng: transform(int(i), rng), seed=seed)
    for i in range(warmup):
        ds[i]
    t0 = time.perf_counter()
    for i in range(warmup, warmup + n):
        ds[i]
    del np
    return n / (time.perf_counter() - t0)


def _consumer(config, out: dict) -> None:
    need = float(config.data.consumer_samples_per_s)
    if need > 0:
        out["consumer_samples_per_s"] = need
        out["ratio_vs_consumer_per_worker"] = out["samples_per_s_per_worker"] / need
        out["workers_for_3x"] = math.ceil(3 * need / out["samples_per_s_per_worker"])


def _task_rates(config, task, record_fn, extra_fn=None) -> dict[str, Any]:
    """Per-worker samples/s of `task.transform` on fresh training records: direct calls and through Grain."""
    import numpy as np

    tc = config.train

    def one(i: int, rng=None):
        return task.transform(record_fn(i), rng if rng is not None else np.random.default_rng(i), tc, True)

    n, w = int(config.data.n_samples), int(config.data.warmup_samples)
    rate, per = _rate(one, n, w)
    grain_rate = _grain_rate(lambda i, rng: one(i + 10_000, rng), n, w, int(config.seed))
    sample = one(0)
    nbytes = sum(np.asarray(v).nbytes for v in sample.values())
    return {"samples_per_s": rate, "samples_per_s_per_worker": rate, "seconds_per_sample": per,
            "grain_samples_per_s_per_worker": grain_rate, "bytes_per_sample": int(nbytes), "n_samples": n,
            "sample_shapes": {k: list(np.shape(v)) for k, v in sample.items()}}


def _host_device() -> dict:
    return {"platform": "host", "kind": "cpu (numpy worker)", "count": 1, "host_cpus": os.cpu_count()}


def run_synth_data(config) -> dict[str, Any]:
    from cinema_jax.tasks.pretrain_mae import PretrainMAE

    task = PretrainMAE()
    tc = config.train
    out = {"name": config.name, "mode": "synth_data", "device": _host_device(), "batch_size": 1,
           "sample": "pretrain_mae transform: phantom render of all views of one frame + zoom + min-max scaling",
           "views": list(tc.data.views), "sax_size": list(tc.data.sax_size), "lax_size": list(tc.data.lax_size)}
    # distinct subjects (index >= 1000) so no cache of a previous sample helps
    out.update(_task_rates(config, task, lambda i: {"seed": 12345, "index": 1000 + i}))
    _consumer(config, out)
    return out


def run_record_data(config) -> dict[str, Any]:
    """The pretraining sample from ArrayRecord cine records (the pre-rendered alternative to the phantom)."""
    import tempfile

    from cinema_jax.data import datasets
    from cinema_jax.tasks.pretrain_mae import PretrainMAE, phantom_config

    task = PretrainMAE()
    tc = config.train
    views = tuple(tc.data.views)
    pcfg = phantom_config(tc)
    n_rec = int(config.data.record_subjects)
    keys = [f"{v}_t" for v in views]

    def records():  # what a UK Biobank-style pretraining record holds: the cine of every view and its spacing
        for i in range(n_rec):
            r = datasets.synthetic_record(12345, 1000 + i, pcfg, views, cine=True)
            yield {"pid": r["pid"], **{k: r[k] for k in keys}, **{f"{v}_spacing": r[f"{v}_spacing"] for v in views}}

    out = {"name": config.name, "mode": "record_data", "device": _host_device(), "batch_size": 1,
           "sample": "pretrain_mae transform on ArrayRecord cine records: read + decode one frame of every view "
                     "(uint8 -> float32) + zoom + min-max scaling; the file is in the page cache (no storage I/O)",
           "views": views, "sax_size": list(tc.data.sax_size), "lax_size": list(tc.data.lax_size),
           "n_frames": int(pcfg.n_frames), "records": n_rec}
    with tempfile.TemporaryDirectory(prefix="cinema_bench_") as tmp:
        path = Path(tmp) / "train.array_record"
        frame_records = bool(config.data.frame_records)
        datasets.write_arrayrecord(path, records(), quantize=keys, frames=keys, frame_records=frame_records)
        size = path.stat().st_size + (datasets.frames_path(path).stat().st_size if frame_records else 0)
        out["bytes_per_record"] = int(size // n_rec)
        out["layout"] = "frame records (companion file)" if frame_records else "frames inline (one member each)"
        src = datasets.ArrayRecordSource(path)
        tc.data.source = "arrayrecord"
        for i in range(n_rec):  # first touch of each record (page faults of the fresh file) outside the timing
            src[i]

        def read_decode(i: int):
            rec = src[i % n_rec]
            return [datasets.frame_of(rec[k], i % pcfg.n_frames) for k in keys]

        rate, per = _rate(read_decode, int(config.data.n_samples), int(config.data.warmup_samples))
        out["read_decode_samples_per_s"], out["read_decode_seconds_per_sample"] = rate, per
        out.update(_task_rates(config, task, lambda i: src[i % n_rec]))
    _consumer(config, out)
    return out


def run_noise_pipeline(config) -> dict[str, Any]:
    """Denoiser training samples per host worker, with the noise made on the accelerator from the host's plan
    (`noise.on_device`, the paper config's default) and, for comparison, all on the host."""
    import copy

    import numpy as np

    from cinema_jax.data import noise as noise_lib
    from cinema_jax.tasks import denoise as dn

    task = dn.DenoiseTask()
    tc = config.train
    d = tc.data
    views = tuple(d.views)
    h5 = str(d.get("source", "synthetic")) == "h5"
    if h5:  # the reference's HDF5 layout, read back by the task's own source on every sample
        tmp = tempfile.TemporaryDirectory()
        _write_h5_cases(Path(tmp.name) / "train.h5", int(config.data.h5_cases), tuple(config.data.h5_case_shape))
        tc.data.path = tmp.name
        source = task.source(tc, "train")

        def record(i: int) -> dict:
            return source[i % len(source)]
    else:
        def record(i: int) -> dict:  # a new subject every sample: the per-process render cache never hits
            view = views[i % len(views)]
            return {"seed": 12345, "index": 1000 + i, "view": view, "slice": 5 if view == "sax" else 0}

    on_device = dn.on_device(tc)
    what = ("read an HDF5 case + one of its g-maps" if h5 else "phantom render of a complex 2D+T slice + g-map")
    out = {"name": config.name, "mode": "noise_pipeline", "device": _host_device(), "batch_size": 1,
           "sample": f"denoise transform: {what} + "
                     + ("noise plan (level, filters, per-axis window factors; the noise is drawn in the step)"
                        if on_device else "coloured noise in SNR units") + " + crop",
           "noise_on_device": on_device, "crop": list(d.crop)}
    if h5:
        out.update(source="h5", case_shape=list(config.data.h5_case_shape), cases=int(config.data.h5_cases))
    else:
        out.update(source="synthetic", image_size=list(d.image_size), n_frames=int(d.n_frames))
    out.update(_task_rates(config, task, record))
    flipped = copy.deepcopy(config)
    flipped.train.noise.on_device = not on_device
    other = _task_rates(flipped, task, lambda i: record(i + 100_000))  # other subjects: no cache hits
    out["other_path"] = {"noise_on_device": not on_device,
                         **{k: other[k] for k in ("samples_per_s_per_worker", "grain_samples_per_s_per_worker")}}
    # the noise alone (plan or synthesis) + crop on an already rendered series (cache hit / real data in memory)
    if h5:
        clean = np.asarray(record(0)["image"], np.complex64)
        tmp.cleanup()
    else:
        clean = dn.render_slice(12345, 0, views[0], 0, tuple(int(v) for v in d.image_size), int(d.n_frames))
    crop = tuple(int(v) for v in d.crop)
    if clean.shape[2] < crop[2]:
        clean = np.concatenate([clean] * math.ceil(crop[2] / clean.shape[2]), axis=2)
    ncfg = dn.noise_config(tc, True)

    def noise_only(i: int):
        o = noise_lib.synthesize(clean, np.random.default_rng(i), ncfg)
        return o["noisy"][: crop[0], : crop[1], : crop[2]]

    def plan_only(i: int):
        return dn.noise_plan_sample(clean, None, np.random.default_rng(i), ncfg, crop, float(d.frame_shuffle_prob))

    n = max(int(config.data.n_samples), 4)
    out["noise_only_samples_per_s_per_worker"], _ = _rate(noise_only, n, 1)
    out["plan_only_samples_per_s_per_worker"], _ = _rate(plan_only, n, 1)
    _consumer(config, out)
    return out


def _write_h5_cases(path: Path, n_cases: int, shape: tuple) -> None:
    """`n_cases` reference-layout cases (/<group>/<case>/{image, gmap}): complex noise around a constant signal in
    SNR units and two smooth g-maps each; only their sizes matter to the benchmark."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    with h5py.File(path, "w") as f:
        for i in range(n_cases):
            img = rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + 20.0
            g = f.create_group(f"site{i % 2}/case{i}")
            g["image"] = img.astype(np.complex64)
            g["gmap"] = np.stack([1 + x * (i + 1), 1 + y * (i + 1)], -1)[:, :, None, :].astype(np.float32)


# ================================================================================================ memory fit
def run_memory_fit(config) -> dict[str, Any]:
    import copy

    import jax

    m = config.memory
    n_fsdp = int(m.fsdp)
    devs = jax.devices()
    if len(devs) < n_fsdp:
        raise ConfigError(f"bench memory_fit: needs {n_fsdp} devices, {len(devs)} visible "
                          f"(XLA_FLAGS=--xla_force_host_platform_device_count={n_fsdp})")
    devs = devs[:n_fsdp]
    budget = int(m.budget_bytes)
    cap = int(m.max_batch_per_device)
    results, best = {}, None
    for size in m.sizes:
        cfg = copy.deepcopy(config)
        cfg.train.model.size = str(size)
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, n_fsdp, 1
        rows, peak, n_params = [], {}, {}

        def measure(bpd: int, cfg=cfg, rows=rows, peak=peak, n_params=n_params, size=size) -> int:
            if bpd not in peak:
                ts = TrainStep(cfg, devs, bpd * n_fsdp)
                n_params.setdefault("n", sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(ts.abstract_params)))
                compiled, cs = ts.compile()
                rep = memory_report(compiled)
                peak[bpd] = int(rep.get("peak_bytes") or 0)
                rows.append({"batch_per_device": bpd, "peak_bytes": peak[bpd],
                             "temp_bytes": rep.get("temp_size_in_bytes"),
                             "argument_bytes": rep.get("argument_size_in_bytes"), "compile_time_s": round(cs, 1)})
                # one progress line per compile (stderr; stdout keeps the single JSON line): huge models take minutes
                print(f"memory_fit: {size} batch/device {bpd}: peak {peak[bpd] / 2**20:.0f} MiB per device "
                      f"(compile {cs:.0f} s)", file=sys.stderr, flush=True)
            return peak[bpd]

        # memory is near-affine in the batch: two compiles predict the largest batch, then compiles bracket it
        # (largest known fit, smallest known miss) and narrow it by secant steps: the figure reported is compiled
        m1, m2 = measure(1), measure(2)
        per_sample = max(m2 - m1, 1)
        static = m1 - per_sample
        fit = None
        if m1 <= budget:
            lo, hi = (2, None) if m2 <= budget else (1, 2)  # lo fits; hi (if known) does not
            if hi is None:
                guess = int(min(cap, max(2, (budget - static) // per_sample)))
                if guess > lo:
                    if measure(guess) <= budget:
                        lo = guess
                    else:
                        hi = guess
                if hi is None and lo < cap and bool(m.check):
                    hi = lo + 1 if measure(lo + 1) > budget else None
                    lo = lo if hi is not None else lo + 1
            while hi is not None and hi - lo > 1:  # secant between the bracket's compiled peaks (near-affine)
                slope = (peak[hi] - peak[lo]) / (hi - lo)
                mid = lo + int((budget - peak[lo]) // slope) if slope > 0 else (lo + hi) // 2
                mid = min(max(mid, lo + 1), hi - 1)
                lo, hi = (mid, hi) if measure(mid) <= budget else (lo, mid)
            fit = lo
        results[str(size)] = {"largest_batch_per_device": fit, "static_bytes_est": int(static),
                              "per_sample_bytes_est": int(per_sample), "n_params": int(n_params["n"]),
                              "compiles": sorted(rows, key=lambda r: r["batch_per_device"])}
        if fit:
            best = {"size": str(size), "batch_per_device": fit}
    return {"name": config.name, "mode": "memory_fit", "device": device_info(devs), "batch_size": None,
            "precision": config.precision, "remat": config.remat, "mesh": {"data": 1, "fsdp": n_fsdp, "tensor": 1},
            "budget_bytes": budget, "largest_fit": best, "sizes": results,
            "method": "compiled.memory_analysis() per device of the FSDP train step lowered on abstract inputs "
                      "(CPU XLA buffer assignment; GPU fusion differs)"}


# ================================================================================================ scaling
def _child_env(n_devices: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    for k in (ENV_COORD, ENV_NPROC, ENV_PID):
        env.pop(k, None)
    env.update(extra or {})
    return env


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in child output:\n{text[-2000:]}")


def _child_cmd(spec: str, overrides: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cinema_jax.bench", f"--config={spec}", *[f"--config.{o}" for o in overrides],
            "--config.mode=train_step", *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(r: dict) -> dict:
    keys = ("batch_size", "step_time_s", "samples_per_s", "flops_per_step", "achieved_flops_per_s",
            "matmul_peak_flops_per_s", "peak_fraction", "collective_bytes_per_device", "collective_probe_s",
            "compute_s_est", "compile_time_s", "peak_memory_bytes")
    out = {k: r.get(k) for k in keys}
    out["devices"] = r["device"]["count"]
    out["processes"] = r["device"].get("process_count", 1)
    out["collectives"] = r.get("collectives", {})
    return out


def run_scaling(config, spec: str, overrides: list[str]) -> dict[str, Any]:
    s = config.scaling
    timeout = int(s.timeout_s)
    base = [o for o in overrides if not o.startswith(("mode=", "batch_size=", "mesh.", "n_devices="))]
    rows: dict[str, list] = {"weak": [], "strong": []}
    for kind in ("weak", "strong"):
        for n in s.device_counts:
            n = int(n)
            bs = int(s.weak_batch_per_device) * n if kind == "weak" else int(s.strong_global_batch)
            cmd = _child_cmd(spec, base, [f"--config.batch_size={bs}", f"--config.n_devices={n}",
                                          "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"])
            p = subprocess.run(cmd, env=_child_env(n), capture_output=True, text=True, timeout=timeout)
            if p.returncode:
                raise RuntimeError(f"scaling child (n={n}) failed:\n{p.stderr[-3000:]}")
            rows[kind].append(_summary(_last_json(p.stdout)))
    for kind, rs in rows.items():
        t1 = rs[0]["step_time_s"] if rs else None
        n1 = rs[0]["devices"] if rs else 1
        for r in rs:
            k = r["devices"] / n1
            # the simulated devices share the same host cores: ideal weak scaling = step time x k (k x the work on
            # fixed hardware), ideal strong scaling = constant step time; efficiency = ideal / measured
            ideal = t1 * k if kind == "weak" else t1
            r["efficiency_fixed_hw"] = ideal / r["step_time_s"]
    multi = []
    nproc = int(s.processes)
    if nproc >= 2:
        for kind in ("weak", "strong"):
            bs = int(s.weak_batch_per_device) * nproc if kind == "weak" else int(s.strong_global_batch)
            port = int(s.port) or _free_port()
            procs = []
            for pid in range(nproc):
                env = _child_env(1, {ENV_COORD: f"127.0.0.1:{port}", ENV_NPROC: str(nproc), ENV_PID: str(pid)})
                cmd = _child_cmd(spec, base, [f"--config.batch_size={bs}", "--config.n_devices=0",
                                              "--config.mesh.data=-1", "--config.mesh.fsdp=1",
                                              "--config.mesh.tensor=1"])
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
            outs = [p.communicate(timeout=timeout) for p in procs]
            for p, (_, e) in zip(procs, outs):
                if p.returncode:
                    raise RuntimeError(f"multi-process scaling child failed:\n{e[-3000:]}")
            r = _summary(_last_json(outs[0][0]))
            r["kind"] = kind
            ref = next((x for x in rows[kind] if x["devices"] == nproc), None)
            r["in_process_step_time_s"] = ref["step_time_s"] if ref else None
            multi.append(r)
    return {"name": config.name, "mode": "scaling", "device": {"platform": "cpu", "kind": "cpu (simulated devices)",
                                                                "count": max(int(n) for n in s.device_counts),
                                                                "host_cpus": os.cpu_count()},
            "batch_size": None, "model": _plain(config.train.model), "precision": config.precision,
            "weak": rows["weak"], "strong": rows["strong"], "multi_process": multi,
            "note": "simulated CPU devices share the host's cores; efficiency_fixed_hw compares with the ideal on "
                    "fixed hardware (weak: time x k, strong: constant)"}


# ================================================================================================ entry point
def _parse_argv(argv: list[str]) -> tuple[str, list[str]]:
    from cinema_jax.config import split_config_flags

    rest, spec, overrides = split_config_flags(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__)
        raise SystemExit(0)
    if rest:
        raise ConfigError(f"bench: unexpected argument {rest[0]!r} (use --config=configs/bench.py:NAME "
                          "[--config.key=value ...])")
    if not spec:
        raise ConfigError("bench: --config=configs/bench.py:NAME is required")
    return spec, overrides


def _maybe_distributed() -> None:
    coord = os.environ.get(ENV_COORD)
    if not coord:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coord, num_processes=int(os.environ[ENV_NPROC]),
                               process_id=int(os.environ[ENV_PID]))


def run(config, spec: str = "", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark of `config.mode` and return its result dict."""
    mode = config.mode
    if mode == "train_step":
        return run_train_step(config)
    if mode == "synth_data":
        return run_synth_data(config)
    if mode == "noise_pipeline":
        return run_noise_pipeline(config)
    if mode == "record_data":
        return run_record_data(config)
    if mode == "memory_fit":
        return run_memory_fit(config)
    if mode == "scaling":
        if not spec:
            raise ConfigError("bench scaling needs the config spec (it re-runs itself in child processes)")
        return run_scaling(config, spec, list(overrides or []))
    raise ConfigError(f"bench: unknown mode {mode!r}")


def main(argv: list[str] | None = None) -> int:
    from cinema_jax.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    spec, overrides = _parse_argv(argv)
    config = load_config(spec, overrides)
    if str(config.get("profile_dir", "") or ""):
        from cinema_jax.step_profile import enable_cpu_op_trace

        enable_cpu_op_trace()  # before jax starts its backend: XLA:CPU reads its flags once
    if config.mode == "memory_fit" and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(config.memory.fsdp)}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _maybe_distributed()
    result = run(config, spec, overrides)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(result, default=_json_default), flush=True)
    return 0


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


if __name__ == "__main__":
    from cinema_jax.errors import CinemaError

    try:
        raise SystemExit(main())
    except CinemaError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
