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
from collections.abc import Iterable, Iterator
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


# ------------------------------------------------------------------------------------------------ output ownership
MARKER = ".cinema-jax.json"  # written into every output directory: what cinema-jax wrote there (see atomic_dir)


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a directory cinema-jax wrote (None when absent or unreadable: not ours)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "cinema-jax" else None


def write_marker(path: str | os.PathLike, kind: str, entries: list[str] | None = None) -> None:
    """Mark `path` as written by cinema-jax: `kind` ('output', 'params', 'dataset', 'run') and, for outputs, the
    top-level entries it wrote (the only ones `--overwrite` may ever delete)."""
    from cinema_jax import __version__

    value = {"written_by": "cinema-jax", "version": __version__, "kind": kind}
    if entries is not None:
        value["entries"] = sorted(entries)
    write_text_atomic(Path(path) / MARKER, json.dumps(value, indent=1))


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_not_source(output: str | os.PathLike, sources: Iterable[str | os.PathLike | None], what: str = "output"
                     ) -> None:
    """Refuse an output that is, contains or lies inside one of `sources` (input scans, checkpoints, weight files):
    writing (or replacing) it there would mix outputs into, or delete, what the command reads."""
    out = _resolved(output)
    for src in sources:
        if src is None or str(src) == "":
            continue
        s = _resolved(src)
        if out == s:
            raise CinemaError(f"{what} {output} is the input {src}; choose another {what}")
        if s.is_relative_to(out):
            raise CinemaError(f"{what} {output} contains the input {src}; choose another {what}")
        if out.is_relative_to(s):
            raise CinemaError(f"{what} {output} lies inside the input {src}; choose another {what}")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an unusable output directory before any work (minutes of inference), with the rule `atomic_dir`
    applies when it writes: a file in the way, an input inside or around it, a non-empty directory without
    `overwrite`, and with `overwrite` anything cinema-jax did not write there."""
    path = Path(path)
    check_not_source(path, sources)
    if path.exists() and not path.is_dir():  # never replaced, not even with `overwrite`: likely a wrong path
        raise CinemaError(f"output directory {path} is an existing file")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CinemaError(f"cannot create directory {path}: {parent} is a file, not a directory")
            break
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return
    if not overwrite:
        raise CinemaError(f"output directory {path} already exists and is not empty (pass --overwrite to replace "
                          f"an output cinema-jax wrote there)")
    marker = read_marker(path)
    if marker is None:
        raise CinemaError(f"output directory {path} was not written by cinema-jax (no {MARKER}; it holds "
                          f"{_some(names)}): --overwrite only replaces cinema-jax outputs; move it or choose another "
                          f"directory")
    if marker.get("kind") == "run":
        raise CinemaError(f"output directory {path} is a training run; --overwrite never replaces one")
    foreign = [n for n in names if n != MARKER and n not in set(marker.get("entries") or ())]
    if foreign:
        raise CinemaError(f"output directory {path} holds {_some(foreign)}, which cinema-jax did not write there: "
                          f"--overwrite never deletes them; move them or choose another directory")


def _some(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike | None] = (),
               kind: str = "output") -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `path`, marked as a cinema-jax `kind` output.

    `path` must not exist or be empty unless `overwrite`, and even then it is replaced only when it is an output
    cinema-jax wrote (its marker lists every entry in it): a user's folder, a training run, or an output holding
    files of someone else's is refused (`check_output_dir`). Nothing is written inside or around `sources`."""
    path = Path(path)
    sources = list(sources)
    check_output_dir(path, overwrite, sources)
    ensure_dir(path.parent)
    tmp = Path(_mktemp(lambda d: tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=d), path.parent, path))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        write_marker(tmp, kind, [p.name for p in tmp.iterdir() if p.name != MARKER])
        check_output_dir(path, overwrite, sources)  # again: the target may have changed while we worked
        if path.exists():  # swap: the old output goes away only once the new one is in place
            old = Path(_mktemp(lambda d: tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=d),
                               path.parent, path))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
