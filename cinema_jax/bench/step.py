"""The model-step benchmarks: `train_step` (the training loop's own jitted, sharded step, timed against the measured
matmul peak) and `memory_fit` (per-device compiled memory of the FSDP step, and the largest batch that fits).

Why a module of its own: both build the loop's step for `config.train` the same way (`TrainStep`, abstract state
for compile-only runs); the data benchmarks (`bench/data.py`) need none of it. jax is imported inside functions.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from typing import Any

from cinema_jax.bench.measure import (
    collective_probe,
    cost_flops,
    device_info,
    device_memory_peak,
    hlo_collectives,
    matmul_peak,
    memory_report,
)
from cinema_jax.config import to_plain
from cinema_jax.errors import ConfigError


# ================================================================================================ train step
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
        # the loop's own plan: shapes, shardings and optimizer state, nothing allocated (train.loop.Setup)
        self.abstract_state = self.setup.abstract_state
        self.abstract_params = self.setup.abstract_params
        self.param_sharding = self.setup.param_shardings
        self.jitted = self.setup.make_step()

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
    profiled = bool(str(config.profile_dir))
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
        "model": to_plain(ts.tc.model), "input_shapes": {k: list(v[0]) for k, v in ts.batch_spec.items()},
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

