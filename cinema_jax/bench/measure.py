"""What the model-step benchmarks measure beside the step time: XLA's cost analysis (FLOPs, bytes), compiled and
allocator memory, the collectives of the compiled HLO, the host's malloc, and the measured matmul peak and all-reduce
time that a step's figures are compared with.

Why a module of its own: these are the instruments, independent of what is benchmarked (`bench/step.py` applies
them to the training step). jax is imported inside the functions, so importing this module starts no backend and
`cinema_jax.bench.main` can still set XLA flags.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from typing import Any

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_COLLECTIVE_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")


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

