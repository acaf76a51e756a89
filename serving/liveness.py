"""Whether each inference worker is moving: its loop marks the time of every turn in memory the HTTP processes share.

An idle worker's loop turns at least once a second (it wakes to stay responsive), a busy
one turns between batches, and its engine marks each decoder step of a batch; a worker
that has not moved for longer than the server's deadline is stuck: a batch that makes no
progress (a wedged GPU), or a process stopped. A batch that is long but stepping is not.
"""

import time
from multiprocessing import RawArray
from typing import Any


class WorkerBeats:
    """The time (``time.monotonic``) of each worker's last turn or step; 0 until its loop first turns."""

    def __init__(self) -> None:
        self._turns: Any = None  # a shared array, one slot per worker: see allocate

    def allocate(self, workers: int) -> None:
        """Make the shared memory: before the workers are spawned and the HTTP processes forked, which get it then."""
        self._turns = RawArray("d", workers)

    def turned(self, worker: int) -> None:
        """Mark a turn of ``worker``'s loop, or a step of its engine (with no memory allocated, nothing)."""
        if self._turns is not None:
            self._turns[worker] = time.monotonic()  # monotonic clocks agree across processes on one machine

    def still(self, limit: float) -> tuple[int, float] | None:
        """A worker that has started and not moved for longer than ``limit`` seconds, and for how long; or ``None``."""
        if self._turns is None:
            return None
        now = time.monotonic()
        for worker, turned in enumerate(self._turns):
            if turned and now - turned > limit:
                return worker, now - turned
        return None

    def stuck(self, deadline: float) -> str | None:
        """Why a worker is stuck, or ``None`` when every worker that has started moved within ``deadline`` seconds."""
        found = self.still(deadline)
        if found is None:
            return None
        worker, seconds = found
        return (
            f"inference worker {worker} has not moved for {seconds:.0f} s, longer than the "
            f"server's deadline of {deadline:g} s: a batch that makes no progress, or a stopped process"
        )
