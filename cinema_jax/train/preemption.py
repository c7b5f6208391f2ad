"""Preemption: SIGTERM (how SLURM and preemptible TPU/GPU VMs stop a job) ends the run at a step boundary, saved.

Why: the default SIGTERM action kills the process at once, abandoning the checkpoint being written and losing up to
`checkpoint_every` steps. Instead the loop finishes the step in flight, saves a checkpoint at it, waits for the save
to commit and exits with EXIT_PREEMPTED; re-running the same command resumes at that step, recomputing nothing.

Multi-process runs must save at the same step on every process. JAX's distributed runtime has a preemption sync
point for that (its coordination service catches SIGTERM on any host and agrees on the next step all hosts reach;
Orbax exposes it as `CheckpointManager.reached_preemption`), so there we ask it every step and install no handler of
our own. A single process catches SIGTERM itself.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (re-running resumes); distinct from errors (2) and kills (137)


class Preempted(Exception):  # noqa: N818 - an outcome, not a failure
    """Raised by the loop after the preemption checkpoint committed; the CLI prints it and exits EXIT_PREEMPTED."""

    def __init__(self, step: int, where: str):
        super().__init__(f"SIGTERM received: stopped after step {step}, checkpoint {step} saved in {where}; re-run "
                         f"the same command to resume")
        self.step = step


class PreemptionWatch:
    """`reached(step, manager)`: True at the step where the run should save and stop. A context manager: the
    single-process SIGTERM handler is installed on entry and the previous one restored on exit."""

    def __init__(self, multi_process: bool):
        self.multi = multi_process
        self.requested = False
        self._previous: Any = None

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True  # acted on at the next step boundary; repeated signals change nothing

    def __enter__(self) -> PreemptionWatch:
        if not self.multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread (a library caller): no handler, SIGTERM acts as before
                self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int, manager) -> bool:
        if self.multi:  # every process calls this at every step (the sync point's contract)
            return bool(manager.reached_preemption(step))
        return self.requested
