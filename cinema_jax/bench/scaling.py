"""The `scaling` benchmark: `train_step` re-run in child processes over 1/2/4/8 simulated CPU devices (weak and
strong scaling) and over local processes joined by jax.distributed on 127.0.0.1.

Why a module of its own: it runs no step itself, it drives `python -m cinema_jax.bench` children and gathers their
JSON lines; `ENV_*` are the variables a child reads to join the distributed run (`cinema_jax.bench.main`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

from cinema_jax.config import to_plain

ENV_COORD = "CINEMA_BENCH_COORDINATOR"
ENV_NPROC = "CINEMA_BENCH_NUM_PROCESSES"
ENV_PID = "CINEMA_BENCH_PROCESS_ID"


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
            "batch_size": None, "model": to_plain(config.train.model), "precision": config.precision,
            "weak": rows["weak"], "strong": rows["strong"], "multi_process": multi,
            "note": "simulated CPU devices share the host's cores; efficiency_fixed_hw compares with the ideal on "
                    "fixed hardware (weak: time x k, strong: constant)"}

