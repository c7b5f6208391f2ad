"""Where a compiled step's time goes: one traced call, its per-op device time summed by op kind and by model scope.

Why: every performance change in notes/perf.md started from such a breakdown, and each session had rebuilt the
script that makes it. `python -m cinema_jax.bench --config=configs/bench.py:NAME --config.profile_dir=DIR` traces one
extra step after the timed ones and adds the summary below to its JSON line; the raw trace stays in DIR for Perfetto
(ui.perfetto.dev) or TensorBoard.

How: `jax.profiler` with a Perfetto trace. On CPU, XLA records one event per thunk only with
`--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS before jax starts (`enable_cpu_op_trace`, which the bench calls).
Each event names its HLO op (`args.hlo_op`). The op's `op_name` metadata in the compiled module gives its source
scope, e.g. `jit(step_fn)/transpose(jvp(DenoisingModel))/backbone/...`; a fusion without metadata takes the most
common scope of the ops it fuses; ops with no metadata at all (XLA:CPU's kernel-gradient convolutions, for one)
are 'unattributed'. Scopes are grouped as forward, backward (`transpose(`) or recompute (`rematted_computation` /
`checkpoint`). Ops can overlap when the executor runs two at once, so the sums are a
guide to where time goes, not a budget that adds up to the step time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

CPU_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_COMP_RE = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME_RE = re.compile(r"op_name=\"([^\"]*)\"")
_CALLS_RE = re.compile(r"calls=%([\w.\-]+)")


def enable_cpu_op_trace() -> bool:
    """Ask XLA:CPU for per-op trace events; only effective before jax initialises its backend. True if set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_TRACE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_TRACE_FLAG).strip()
    return True


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> op_name (source scope), for every instruction of the compiled module; a fusion or
    call without its own metadata gets the most common op_name inside the computation it calls."""
    own: dict[str, str] = {}
    calls: dict[str, str] = {}
    comp_ops: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        m = _COMP_RE.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(1)
            continue
        if "=" not in line or not line.lstrip().startswith(("%", "ROOT")):
            continue
        name = line.split("=", 1)[0].replace("ROOT", "").strip().lstrip("%")
        op = _OP_NAME_RE.search(line)
        if op:
            own[name] = op.group(1)
            if current:
                comp_ops[current].append(op.group(1))
        c = _CALLS_RE.search(line)
        if c:
            calls[name] = c.group(1)
    out = dict(own)
    for name, comp in calls.items():
        if name not in out and comp_ops.get(comp):
            out[name] = collections.Counter(comp_ops[comp]).most_common(1)[0][0]
    return out


def phase_and_scope(op_name: str, depth: int = 3) -> tuple[str, str]:
    """('forward' | 'backward' | 'recompute', the first `depth` module names) of an op_name."""
    phase = "backward" if "transpose(" in op_name else "forward"
    if "rematted_computation" in op_name or "checkpoint" in op_name:
        phase = "recompute" if phase == "forward" else phase
    parts = []
    for p in op_name.split("/"):
        if p.startswith("jit(") or not p:
            continue
        while True:  # unwrap transpose(jvp(Name)) / jvp(Name) / checkpoint(...)
            m = re.fullmatch(r"[\w_]+\((.*)\)", p)
            if not m:
                break
            p = m.group(1)
        if not p or p in ("rematted_computation", "checkpoint", "remat"):
            continue
        parts.append(p)
    return phase, "/".join(parts[:depth]) or "(unscoped)"


def _kind(op: str) -> str:
    return re.sub(r"\.\d+$", "", op)


def summarize_trace(trace_dir: str | os.PathLike, hlo_text: str, depth: int = 3, top: int = 12) -> dict[str, Any]:
    """Per-op time of the newest Perfetto trace under `trace_dir` (one traced step), by kind, phase and scope."""
    paths = sorted(glob.glob(str(Path(trace_dir) / "**" / "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    scopes = op_scopes(hlo_text)
    by_kind: collections.Counter = collections.Counter()
    by_phase: collections.Counter = collections.Counter()
    by_scope: collections.Counter = collections.Counter()
    count = 0
    for e in events:
        args = e.get("args") or {}
        op = args.get("hlo_op")
        if e.get("ph") != "X" or not op or str(e.get("name", "")).startswith("end: "):
            continue
        dur = float(e.get("dur", 0.0)) * 1e-6  # trace durations are in microseconds
        count += 1
        by_kind[_kind(op)] += dur
        name = scopes.get(op)
        phase, scope = phase_and_scope(name, depth) if name else ("unattributed", "(no op_name in the HLO)")
        by_phase[phase] += dur
        by_scope[f"{phase}: {scope}"] += dur
    total = sum(by_kind.values())

    def table(counter):
        return [[k, round(v, 4), round(v / total, 4) if total else 0.0] for k, v in counter.most_common(top)]

    return {"trace": paths[-1], "ops_traced": count, "op_time_s": round(total, 4),
            "by_phase": {k: round(v, 4) for k, v in by_phase.most_common()},
            "by_kind": table(by_kind), "by_scope": table(by_scope),
            "note": "per-op device time of one traced step, [name, seconds, share]; ops may overlap"}


def profile_step(fn, args, trace_dir: str | os.PathLike, hlo_text: str, depth: int = 3) -> dict[str, Any]:
    """Trace one call `fn(*args)` (blocked until done) into `trace_dir` and summarise it. Returns the summary and
    the call's outputs under 'outputs' (the caller keeps donated state alive through them)."""
    import jax

    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    try:
        outputs = fn(*args)
        jax.block_until_ready(outputs)
    finally:
        jax.profiler.stop_trace()
    summary = summarize_trace(trace_dir, hlo_text, depth)
    if summary["ops_traced"] == 0:
        summary["warning"] = f"no per-op events in the trace; on CPU start the process with XLA_FLAGS={CPU_TRACE_FLAG}"
    return {"summary": summary, "outputs": outputs}
