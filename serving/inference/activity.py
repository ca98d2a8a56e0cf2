"""Which of the --workers run inference now, shared between them: large batches take idle cores.

With SO_REUSEPORT the kernel gives each connection to one worker, so one client (gRPC's one channel,
a batch job, a gateway with few connections) keeps one worker busy while the others idle. Measured
on 2 cores, 2 workers, 8 callers x 64 images (make bench, one run, shared machine, ratios to the
naive server): from one connection, large batches on one onnxruntime thread 0.74x, on two 0.90x;
from 8 connections (both workers busy), one thread each 1.57x, two each 1.14x (4 threads on 2
cores). So a worker runs a large batch on all cores only while no other worker has run a batch
in the last `IDLE_AFTER` seconds, and on one thread otherwise.

The board is one shared double per worker (a lock-free RawArray made by the parent): +inf while its
worker runs a batch, else when it last finished one (time.monotonic, one clock for all processes).

Other processes count too: on a machine crowded by other work (load average above
`CROWDED_PER_CORE` runnable tasks per core) a large batch stays on one thread, since a two-thread
run waits for whichever of its threads the kernel has descheduled. Measured on the same 2 cores
with other jobs at load 27-29: in-process batch 64 on 2 threads 1,319-1,749 images/s against
2,072-2,188 on one; the server from one connection 1,173-1,744 against 2,464-2,880 images/s, while
at load 4.5 two threads were 22 % ahead.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Protocol

# A worker under load starts its next batch within a few ms of the last (receiving a 64-image call
# costs about 1 ms of CPU); longer quiet means its core is free.
IDLE_AFTER = 0.005
# Two threads won at load 4.5 on 2 cores and lost by 2.5x at 27: the line is drawn between them.
CROWDED_PER_CORE = 3.0
_LOAD_EVERY = 1.0  # seconds between reads of the load average (a 1-minute mean anyway)


def crowded(load: float, cores: int) -> bool:
    """Whether a machine with this 1-minute load average has no core to spare."""
    return load > CROWDED_PER_CORE * cores


class _Machine:
    """The load average, read at most once a second (os.getloadavg reads /proc/loadavg)."""

    def __init__(self) -> None:
        self.cores = self._cores = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        )
        self._read_at = -math.inf
        self._crowded = False

    def crowded(self) -> bool:
        now = time.monotonic()
        if now - self._read_at > _LOAD_EVERY:
            self._read_at = now
            try:
                self._crowded = crowded(os.getloadavg()[0], self._cores)
            except OSError:  # no load average here
                self._crowded = False
        return self._crowded


MACHINE = _Machine()


class Activity(Protocol):
    def others_idle(self) -> bool: ...
    def started(self) -> None: ...
    def finished(self) -> None: ...


class Alone:
    """A lone server process: nobody else to leave cores to."""

    def others_idle(self) -> bool:
        return not MACHINE.crowded()

    def started(self) -> None: ...
    def finished(self) -> None: ...


class WorkerActivity:
    """One worker's view of the shared board (`slots`: a sequence of floats shared by all).

    A worker may run several batches at once (DynamicBatcher's `parallel`), on its threads: its
    slot says busy from the first one's start to the last one's end.
    """

    def __init__(self, slots, index: int) -> None:
        self._slots = slots
        self._index = index
        self._others = [i for i in range(len(slots)) if i != index]
        self._lock = threading.Lock()
        self._runs = 0

    def others_idle(self) -> bool:
        now = time.monotonic()
        idle = all(now - self._slots[i] > IDLE_AFTER for i in self._others)
        return idle and not MACHINE.crowded()

    def started(self) -> None:
        with self._lock:
            self._runs += 1
            self._slots[self._index] = math.inf

    def finished(self) -> None:
        with self._lock:
            self._runs -= 1
            if not self._runs:
                self._slots[self._index] = time.monotonic()


def new_board(context, workers: int):
    """The shared slots, made by the parent before it starts `workers` processes of `context`."""
    board = context.RawArray("d", workers)
    for i in range(workers):
        board[i] = -math.inf  # never ran a batch
    return board


_current: Activity = Alone()


def current() -> Activity:
    return _current


def batch_slots() -> int:
    """How many batches this process may run at once now: every core while the others idle."""
    return MACHINE.cores if _current.others_idle() else 1


def join(board, index: int) -> None:
    """Called once in a worker process, before its model loads."""
    global _current
    _current = WorkerActivity(board, index)
