"""Expand a config's sweep into runs: print the commands (default) or run them one after another.

A config declares its sweep either as `get_sweep(variant) -> [{'dotted.key': value, ...}, ...]` (one dict per run)
or as `config.sweep = [{'dotted.key': [v1, v2], ...}, ...]` (each dict is a grid; the runs are the union of the
grids' cartesian products). Every run gets its own workdir `<workdir>/<index>_<key=value,...>`; re-running the same
sweep resumes each run (the loop resumes from a workdir's latest checkpoint).

    python launch/sweep.py --config=configs/mae_pretrain.py:base --workdir=runs/mae_sweep [--run] [-- extra flags]
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinema_jax.config import load_base, load_module, split_spec  # noqa: E402
from cinema_jax.errors import CinemaError  # noqa: E402


def expand_grid(grid: dict) -> list[dict]:
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def sweep_runs(spec: str) -> list[dict]:
    """The list of override dicts a config declares (get_sweep wins over config.sweep)."""
    module = load_module(spec)
    _, variant = split_spec(spec)
    if hasattr(module, "get_sweep"):
        runs = module.get_sweep(variant) if variant is not None else module.get_sweep()
        return [dict(r) for r in runs]
    config = load_base(spec)
    if "sweep" not in config:
        raise CinemaError(f"{spec} declares no sweep (get_sweep() or config.sweep)")
    runs = []
    for grid in config.sweep:
        runs.extend(expand_grid(dict(grid)))
    return runs


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def run_name(index: int, overrides: dict) -> str:
    text = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in overrides.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def commands(spec: str, workdir: str, extra: list[str]) -> list[list[str]]:
    out = []
    for i, overrides in enumerate(sweep_runs(spec)):
        cmd = ["cinema-jax", "train", f"--config={spec}", f"--workdir={Path(workdir) / run_name(i, overrides)}"]
        cmd += [f"--config.{k}={_fmt(v)}" for k, v in overrides.items()]
        out.append(cmd + list(extra))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    parser.add_argument("--workdir", required=True, help="parent directory of the runs")
    parser.add_argument("--run", action="store_true", help="run the commands sequentially instead of printing them")
    args = parser.parse_args(argv)
    try:
        cmds = commands(args.config, args.workdir, extra)
    except CinemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if args.run:
            code = subprocess.call([sys.executable, "-m", "cinema_jax", *cmd[1:]])
            if code:
                return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
