"""launch/: sweep expansion, the cluster scripts' syntax, and the tcmalloc wrapper."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))

import sweep  # noqa: E402


def test_get_sweep_expands_mask_ratio_lr_size(tmp_path):
    cmds = sweep.commands("configs/mae_pretrain.py:base", str(tmp_path), ["--config.total_steps=5"])
    assert len(cmds) == 18
    flags = {c for cmd in cmds for c in cmd if c.startswith("--config.model.size=")}
    assert flags == {"--config.model.size=base", "--config.model.size=large"}
    assert all(cmd[-1] == "--config.total_steps=5" and cmd[:2] == ["cinema-jax", "train"] for cmd in cmds)
    assert len({c[3] for c in cmds}) == 18  # distinct workdirs


def test_config_sweep_grids(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import ml_collections\n"
                   "def get_config(arg=None):\n"
                   "    c = ml_collections.ConfigDict(dict(seed=0, optim=dict(lr=1.0)))\n"
                   "    c.sweep = [{'optim.lr': [1, 2], 'seed': [0, 1]}, {'seed': 5}]\n"
                   "    return c\n")
    runs = sweep.sweep_runs(str(cfg))
    assert runs == [{"optim.lr": 1, "seed": 0}, {"optim.lr": 1, "seed": 1}, {"optim.lr": 2, "seed": 0},
                    {"optim.lr": 2, "seed": 1}, {"seed": 5}]


def test_sweep_cli_prints_commands(tmp_path):
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/mae_pretrain.py:smoke",
                          f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 18


def test_cluster_scripts_parse():
    for script in ("launch/tpu_pod.sh", "launch/slurm_gpu.sbatch", "launch/with_tcmalloc.sh"):
        assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    usage = subprocess.run(["bash", "launch/tpu_pod.sh"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "worker" in usage.stdout


def _wrapped(*cmd, **env):
    return subprocess.run(["bash", "launch/with_tcmalloc.sh", *cmd], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, LD_PRELOAD="", **env), timeout=120)


def test_with_tcmalloc_preloads_it_or_says_why_not():
    off = _wrapped("bash", "-c", "echo \"[$LD_PRELOAD]\"", TCMALLOC="off")
    assert off.returncode == 0 and off.stdout.strip() == "[]"
    missing = _wrapped("true", TCMALLOC="/no/such/libtcmalloc.so")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    auto = _wrapped(sys.executable, "-c", "from cinema_jax.bench import host_malloc; print(host_malloc())")
    assert auto.returncode == 0, auto.stderr
    if "not found" in auto.stderr:
        assert auto.stdout.strip() == "glibc"
        pytest.skip("libtcmalloc is not installed here (Debian: apt-get install libtcmalloc-minimal4)")
    assert auto.stdout.strip() == "tcmalloc"
