"""A run directory's ownership: only a cinema-jax run is trained into, by one writer at a time.

Why: `train --workdir` rewrites `config.json`, cuts `metrics.jsonl` back to the restored step and replaces pictures.
Pointed at an ordinary folder that already holds such names it would destroy them; two processes on one run
interleave their checkpoints and metrics. So (process 0 of a run, which writes the shared files):
  - `claim(workdir)`: an empty or new folder becomes a run (marker `.cinema-jax.json`, kind 'run'); a marked run,
    or an unmarked one whose entries are all run outputs (written before the marker existed), is resumed; anything
    else is refused, naming what is there.
  - `RunLock`: `<workdir>/.cinema-jax.lock` holds the owner's host, pid and start time under an exclusive `flock`
    held for the life of the run and is removed on exit. The kernel drops the flock when its process dies (even by
    SIGKILL), so a lock file left behind by a dead process is stale by construction and is taken over; a live holder
    refuses the second process with one line naming it. (flock works across hosts on NFS; a filesystem without it
    is refused with a clear message rather than run unlocked.)
  - `clean_leftovers(workdir)`: temporary files and folders of atomic writes killed half-way are removed.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path

from cinema_jax.errors import ConfigError
from cinema_jax.fileutil import MARKER, ensure_dir, read_marker, write_marker

LOCK = ".cinema-jax.lock"
# what a run of ours holds (checked only for runs written before the marker existed)
RUN_ENTRIES = {"config.json", "checkpoints", "best", "metrics.jsonl", "tensorboard", "images", MARKER, LOCK}
# eval outputs; the logs of processes > 0 that launch/local_multiprocess.py keeps beside the run
_RUN_PATTERNS = (re.compile(r"^eval_.+\.json$"), re.compile(r"^process_\d+\.log$"))
# temporary names of fileutil.atomic_path / atomic_dir: '.<name>.<8 random chars>.tmp[<suffix>]' / '.old'
_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|old)(\..*)?$")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or any(p.match(name) for p in _RUN_PATTERNS) or bool(_LEFTOVER.match(name))


def claim(workdir: Path) -> None:
    """Make `workdir` a run (create + mark) or check it is one; ConfigError naming the contents otherwise."""
    workdir = ensure_dir(workdir)
    marker = read_marker(workdir)
    if marker is not None:
        if marker.get("kind") != "run":
            raise ConfigError(f"--workdir {workdir} holds a cinema-jax {marker.get('kind', '?')} output, not a "
                              f"training run; choose another --workdir")
        return
    # the caller's own lock, launcher logs and leftovers of killed writes say nothing about whose folder it is
    names = sorted(p.name for p in workdir.iterdir() if p.name != LOCK and not _LEFTOVER.match(p.name)
                   and not _RUN_PATTERNS[1].match(p.name))
    foreign = [n for n in names if not _is_run_entry(n)]
    legacy = {"config.json", "checkpoints", "best"} & set(names)
    if names and (foreign or not legacy):
        shown = ", ".join(repr(n) for n in (foreign or names)[:4])
        more = len(foreign or names) - 4
        raise ConfigError(f"--workdir {workdir} is not empty and is not a cinema-jax run (it holds {shown}"
                          f"{f' and {more} more' if more > 0 else ''}); choose a new or empty --workdir")
    write_marker(workdir, "run")


def clean_leftovers(workdir: Path) -> list[Path]:
    """Remove temporary files / folders that atomic writes killed half-way left in the run (and its images/);
    call with the run lock held. Orbax cleans its own temporary step folders (`cleanup_tmp_directories`)."""
    removed = []
    for folder in (workdir, workdir / "images"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _LEFTOVER.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (unreadable lock file)"


class RunLock:
    """Exclusive lock on a run directory for one writer (see module docstring). Use as a context manager."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK
        self._fd: int | None = None
        self.took_over: str | None = None  # the dead holder whose stale lock was taken over

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                text = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"--workdir {self.path.parent} is in use by {_holder(text)} (lock "
                                      f"{self.path}); wait for it to finish or stop it") from None
                raise ConfigError(f"cannot lock --workdir {self.path.parent}: {e.strerror or e} (the filesystem "
                                  f"must support flock)") from None
            try:  # the holder we waited on may have unlinked the file just before we locked it: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if old:  # a holder that died without releasing (SIGKILL, power loss): its flock went with it
            self.took_over = _holder(old)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Idempotent: remove the lock file, then unlock (a waiting locker re-checks the path, see `acquire`)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
