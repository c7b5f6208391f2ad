"""SIGKILL a training subprocess after a checkpoint, re-run the same command: same final params as a clean run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cinema_jax.train import checkpoint as ckpt
from cinema_jax.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def command(args, workdir):
    return [sys.executable, "-m", "cinema_jax", "train", *args, f"--workdir={workdir}"]


def env(extra=None):
    e = dict(os.environ, CINEMA_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
    e.update(extra or {})
    return e


def run(args, workdir, extra_env=None):
    out = subprocess.run(command(args, workdir), cwd=ROOT, env=env(extra_env), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


def kill_after_checkpoint(args, workdir, step, extra_env=None, timeout=600):
    proc = subprocess.Popen(command(args, workdir), cwd=ROOT, env=env(extra_env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = Path(workdir) / "checkpoints" / str(step) / "commit_success.txt"
    t0 = time.time()
    try:
        while not marker.exists():
            assert proc.poll() is None, "run finished before it could be killed"
            assert time.time() - t0 < timeout
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def final_params(workdir):
    params, _ = ckpt.load_params(ckpt.latest_step_dir(Path(workdir)))
    return jax.tree_util.tree_leaves_with_path(params)


def check_same(a, b, rtol):
    pa, pb = final_params(a), final_params(b)
    assert [p for p, _ in pa] == [p for p, _ in pb]
    for (p, x), (_, y) in zip(pa, pb):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-6, err_msg=str(p))
    la = [(r["step"], r["loss"]) for r in read_metrics(a) if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_metrics(b) if "loss" in r]
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([v for _, v in lb], [v for _, v in la], rtol=rtol)


def test_sigkill_and_resume_toy(tmp_path):
    args = ["--config=tests/train/toy_config.py", "--config.total_steps=24", "--config.checkpoint_every=4"]
    slow = {"TOY_SAMPLE_DELAY": "0.01"}  # ~0.2 s per step so the kill lands mid-run
    run(args, tmp_path / "clean")
    kill_after_checkpoint(args, tmp_path / "killed", 8, slow)
    assert ckpt.latest_step_dir(tmp_path / "killed").name != "24"
    run(args, tmp_path / "killed")
    check_same(tmp_path / "clean", tmp_path / "killed", rtol=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_mae_smoke(tmp_path):
    args = ["--config=configs/mae_pretrain.py:smoke", "--config.total_steps=24", "--config.checkpoint_every=4",
            "--config.log_every=1", "--config.eval_every=0", "--config.image_every=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    run(args, tmp_path / "clean")
    kill_after_checkpoint(args, tmp_path / "killed", 4)
    run(args, tmp_path / "killed")
    check_same(tmp_path / "clean", tmp_path / "killed", rtol=1e-4)
