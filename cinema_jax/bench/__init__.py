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

Modules: `measure` (cost analysis, memory, collectives, matmul peak), `step` (train_step, memory_fit), `data`
(synth_data, record_data, noise_pipeline), `scaling`; this one parses the command line and dispatches on the mode.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from cinema_jax.bench.data import run_noise_pipeline, run_record_data, run_synth_data
from cinema_jax.bench.measure import hlo_collectives, host_malloc, matmul_peak
from cinema_jax.bench.scaling import ENV_COORD, ENV_NPROC, ENV_PID, run_scaling
from cinema_jax.bench.step import TrainStep, run_memory_fit, run_train_step
from cinema_jax.errors import ConfigError

# the harness's API (tests, tools/torch_reference_bench.py's notes): the step, the HLO and host probes
__all__ = ["TrainStep", "hlo_collectives", "host_malloc", "main", "matmul_peak", "run"]


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

