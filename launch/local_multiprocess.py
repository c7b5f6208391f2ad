"""Run `cinema-jax train` as N local processes on 127.0.0.1, each with simulated CPU devices (multi-host rehearsal).

Why: multi-host code paths (jax.distributed, per-process data slicing, global arrays built from process-local data,
Orbax multi-process checkpoints) can be exercised on one machine. Only `jax.distributed` is used: each process gets
CINEMA_COORDINATOR / CINEMA_NUM_PROCESSES / CINEMA_PROCESS_ID, which `cinema_jax.train.loop` turns into
`jax.distributed.initialize(...)`.

    python launch/local_multiprocess.py --num-processes 2 --devices-per-process 4 -- \
        --config=configs/mae_pretrain.py:smoke --workdir=runs/mp --config.total_steps=8
Process 0's output is shown; the others' go to <workdir>/process_<i>.log. Exit code: the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir_of(train_args: list[str]) -> Path:
    for i, a in enumerate(train_args):
        if a.startswith("--workdir="):
            return Path(a.split("=", 1)[1])
        if a == "--workdir" and i + 1 < len(train_args):
            return Path(train_args[i + 1])
    raise SystemExit("error: pass --workdir=DIR after --")


def launch(num_processes: int, devices_per_process: int, train_args: list[str], timeout: float | None = None) -> int:
    port = free_port()
    workdir = workdir_of(train_args)
    workdir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(
            CINEMA_COORDINATOR=f"127.0.0.1:{port}",
            CINEMA_NUM_PROCESSES=str(num_processes),
            CINEMA_PROCESS_ID=str(pid),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        )
        if pid:
            env["CINEMA_NO_PROGRESS"] = "1"
        out = None if pid == 0 else open(workdir / f"process_{pid}.log", "w")  # noqa: SIM115
        logs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "cinema_jax", "train", *train_args], env=env,
                                      stdout=out, stderr=subprocess.STDOUT if out else None))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return 124
    finally:
        for f in logs:
            if f is not None:
                f.close()
    return next((c for c in codes if c), 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, train_args = argv[:split], argv[split + 1:]
    else:
        own, train_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(own)
    if not train_args:
        parser.error("give the train arguments after --")
    return launch(args.num_processes, args.devices_per_process, train_args, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
