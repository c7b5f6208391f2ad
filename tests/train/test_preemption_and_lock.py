"""Preemption and one writer per run (issue 21, classes 2 and 4), on real `cinema-jax train` subprocesses.

Before: SIGTERM killed the run at once, abandoning the save in progress (up to `checkpoint_every` steps lost); two
`train` processes on one workdir crashed one with a traceback and left the other with 6 of 30 metric rows. Now SIGTERM
finishes the step in flight, saves it, waits for the commit and exits 75; a second writer is refused with one line
naming the holder, and a lock left by a killed process is taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_kill_resume import ROOT, check_same, command, env, run  # noqa: E402

from cinema_jax.errors import ConfigError  # noqa: E402
from cinema_jax.train import checkpoint as ckpt  # noqa: E402
from cinema_jax.train.logging import read_metrics  # noqa: E402
from cinema_jax.train.preemption import EXIT_PREEMPTED  # noqa: E402
from cinema_jax.train.workdir import LOCK, RunLock  # noqa: E402

TOY = ["--config=tests/train/toy_config.py", "--config.total_steps=40", "--config.checkpoint_every=100",
       "--config.log_every=1"]
SLOW = {"TOY_SAMPLE_DELAY": "0.01"}  # ~0.2 s a step: the signal lands mid-run


def _wait_rows(workdir: Path, n: int, proc, timeout=300):
    t0 = time.time()
    while len(read_metrics(workdir)) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_sigterm_saves_the_step_in_flight_and_resume_matches(tmp_path):
    run(TOY, tmp_path / "clean")
    work = tmp_path / "preempted"
    proc = subprocess.Popen(command(TOY, work), cwd=ROOT, env=env(SLOW), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(work, 8, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("preempted:", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("preempted: SIGTERM received: stopped after step"), err[-2000:]
    saved = int(ckpt.latest_step_dir(work).name)
    logged = [r["step"] for r in read_metrics(work)]
    assert 8 <= saved < 40 and logged == list(range(1, saved + 1))  # the checkpoint is the last step run: none lost
    assert f"stopped after step {saved}," in lines[0]
    assert not (work / LOCK).exists()

    run(TOY, work)  # resumes at `saved`: steps 1..saved are not recomputed (their rows are the first process's)
    rows = read_metrics(work)
    assert [r["step"] for r in rows] == list(range(1, 41))
    check_same(tmp_path / "clean", work, rtol=1e-5)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    work = tmp_path / "run"
    args = TOY[:1] + ["--config.total_steps=30", "--config.checkpoint_every=10", "--config.log_every=1"]
    first = subprocess.Popen(command(args, work), cwd=ROOT, env=env(SLOW), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_rows(work, 2, first)
        second = subprocess.run(command(args, work), cwd=ROOT, env=env(), capture_output=True, text=True,
                                timeout=300)
        _, err1 = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2
    err = second.stderr.strip()
    assert err.startswith("error: ") and err.count("\n") == 0, err
    assert f"in use by pid {first.pid} on host" in err
    assert [r["step"] for r in read_metrics(work) if "loss" in r] == list(range(1, 31))  # all 30 rows kept


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    import sys as _sys

    work = tmp_path / "run"
    work.mkdir()
    holder = subprocess.Popen([_sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from cinema_jax.train.workdir import RunLock; "
        f"RunLock({str(work)!r}).acquire(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} on host"):
            RunLock(work).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    assert json.loads((work / LOCK).read_text())["pid"] == holder.pid  # left behind, stale
    lock = RunLock(work).acquire()
    assert f"pid {holder.pid}" in lock.took_over
    assert json.loads((work / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (work / LOCK).exists()


def _process_of(workdir: Path, process_id: int) -> int:
    """PID of the `cinema-jax train` process `process_id` that launch/local_multiprocess.py started for `workdir`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--workdir={workdir}".encode() in cmd and f"CINEMA_PROCESS_ID={process_id}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"process {process_id} of {workdir} not found")


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path):
    """Multi-host: SIGTERM reaches one process only; JAX's preemption sync point makes both save the same step."""
    work = tmp_path / "mp"
    args = [*TOY, "--config.mesh.data=4", "--config.mesh.fsdp=2"]
    proc = subprocess.Popen([sys.executable, "launch/local_multiprocess.py", "--num-processes=2",
                             "--devices-per-process=4", "--timeout=600", "--", *args, f"--workdir={work}"],
                            cwd=ROOT, env=env(SLOW), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_rows(work, 5, proc)
        os.kill(_process_of(work, 1), signal.SIGTERM)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = out + (work / "process_1.log").read_text()
    assert proc.returncode == EXIT_PREEMPTED, logs[-3000:]
    steps = [int(ln.split("stopped after step ")[1].split(",")[0]) for ln in logs.splitlines()
             if ln.startswith("preempted:")]
    assert len(steps) == 2 and steps[0] == steps[1], logs[-3000:]  # both processes report, and the same step
    step = steps[0]
    assert 5 <= step < 40 and ckpt.latest_step_dir(work).name == str(step)
    assert (work / "checkpoints" / str(step) / "commit_success.txt").exists()
    assert [r["step"] for r in read_metrics(work)] == list(range(1, step + 1))
