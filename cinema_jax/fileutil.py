"""Atomic file output: nothing the package writes is ever left half-written.

Every writer goes through `atomic_path` (single file) or `atomic_dir` (a directory of outputs): content is
written under a temporary name in the same directory and renamed into place only when complete, so a crash or
an exception leaves either the old state or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cinema_jax.errors import CinemaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p path`, but a file in the way or a missing permission is a one-line CinemaError (a user's wrong
    output path), not an OSError traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else (e.strerror or str(e))
        raise CinemaError(f"cannot create directory {path}: {why}") from None
    return path


def _mktemp(make, where: Path, target: Path):
    """`tempfile.mkstemp` / `mkdtemp` beside `target`; an unwritable directory is a CinemaError."""
    try:
        return make(where)
    except OSError as e:
        raise CinemaError(f"cannot write {target}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    The temporary name keeps the suffix (e.g. `.nii.gz`, `.png`) so libraries that infer the format from
    the extension keep working.
    """
    path = Path(path)
    if path.is_dir():
        raise CinemaError(f"output file {path} is an existing directory")
    ensure_dir(path.parent)
    suffix = "".join(path.suffixes)
    fd, tmp = _mktemp(lambda d: tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=d),
                      path.parent, path)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def clean_json(value):
    """Values -> strict JSON: NaN/Inf -> null (an undefined metric, e.g. the EF of an empty LV), numpy scalars and
    arrays -> Python."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def write_json_atomic(path: str | os.PathLike, value, indent: int = 1, sort_keys: bool = False) -> None:
    """`clean_json(value)` as strict JSON (never a NaN token), written atomically."""
    write_text_atomic(path, json.dumps(clean_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (which must not exist unless `overwrite`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # never replaced, not even with `overwrite`: likely a wrong path
        raise CinemaError(f"output directory {path} is an existing file")
    ensure_dir(path.parent)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise CinemaError(f"output directory {path} already exists and is not empty")
    tmp = Path(_mktemp(lambda d: tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=d), path.parent, path))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
