"""Device prefetch for the training loop: the next batches are already on the accelerator when the step needs them.

Why: the host pipeline (Grain) and the host-to-device copy must not stall the step. JAX's async dispatch already lets
the host prepare batch n+1 while step n runs; this buffer also starts the copies of the next `size` batches early,
so a slow transfer or a pipeline hiccup is hidden behind compute.

Why it is more than a deque: the run checkpoints the Grain iterator's state with the model. With batches buffered,
the iterator is ahead of training, so saving its current state would skip the buffered batches on resume. The buffer
records the iterator's state before each fetch and reports the state of the first batch not yet handed to the
step; restoring clears the buffer. It speaks the Grain checkpoint protocol for non-DatasetIterator items (state as
JSON bytes, `start_prefetch` after restore), so `grain.checkpoint.CheckpointSave(prefetcher)` works unchanged.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetch:
    """Iterate `put(batch)` for each host batch of `iterator`, keeping `size` of them in flight ahead of the caller."""

    def __init__(self, iterator: Iterator, put: Callable[[Any], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"device prefetch size must be >= 1, got {size}")
        self._it, self._put, self._size = iterator, put, int(size)
        self._buf: collections.deque = collections.deque()  # (json state before the batch, device batch)
        self._exhausted = False

    def __iter__(self):
        return self

    def _state(self) -> str:
        return json.dumps(self._it.get_state())

    def _fill(self) -> None:
        while len(self._buf) < self._size and not self._exhausted:
            state = self._state()
            try:
                host = next(self._it)
            except StopIteration:
                self._exhausted = True
                return
            self._buf.append((state, self._put(host)))  # device_put is async: the copy overlaps the running step

    def __next__(self):
        self._fill()
        if not self._buf:
            raise StopIteration
        _, batch = self._buf.popleft()
        self._fill()  # start the next copy before the caller dispatches its step
        return batch

    # Grain checkpoint protocol (grain.checkpoint.CheckpointSave / CheckpointRestore)
    def get_state(self) -> bytes:
        """The iterator state at the first batch not yet returned by `next` (JSON bytes)."""
        return (self._buf[0][0] if self._buf else self._state()).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, bytes | bytearray):
            state = state.decode()
        if isinstance(state, str):
            state = json.loads(state)
        self._buf.clear()
        self._exhausted = False
        self._it.set_state(state)

    def start_prefetch(self) -> None:
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()

    def close(self) -> None:
        self._buf.clear()
        if hasattr(self._it, "close"):
            self._it.close()
