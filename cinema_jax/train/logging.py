"""Run logging: `metrics.jsonl`, TensorBoard scalars and a tqdm progress bar (process 0 only).

Why JSON lines: one self-contained object per logged step, appended and flushed line by line, so a killed run leaves
a valid file. On resume the file is first cut back to the restored step (atomic rewrite) so replayed steps are not
logged twice and the curve of a resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cinema_jax.fileutil import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def _json_value(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return v
    return f if math.isfinite(f) else str(f)


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line from a killed run
            continue
    return rows


class MetricsWriter:
    """Appends JSON lines and TensorBoard scalars; inactive (no files) on processes other than 0."""

    def __init__(self, workdir: str | Path, active: bool = True, resume_step: int = 0, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.active = active
        self._tb = None
        if not active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        if path.exists():
            keep = [r for r in read_metrics(self.workdir) if int(r.get("step", 0)) <= resume_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional; metrics.jsonl is the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({f"{prefix}{k}": _json_value(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k if prefix else f"train/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        """Idempotent. Must run on every exit path: an open TensorBoard writer's atexit hook prints a traceback."""
        if not self.active:
            return
        self.active = False
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, active: bool):
    """tqdm bar with ETA (disabled off process 0 or when `CINEMA_NO_PROGRESS` is set)."""
    from tqdm import tqdm

    disable = not active or bool(os.environ.get("CINEMA_NO_PROGRESS"))
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                desc="train", smoothing=0.1)
