"""Dynamic batching: one queue of requests, coalesced into batches for a blocking `infer` function.

Knows nothing of gRPC or ONNX: it takes arrays and returns arrays. While one
batch runs, new requests queue up; the next batch takes all of them, up to
`max_batch_size` images. So an idle server runs a lone request at once, and a
busy one forms large batches without ever waiting on a timer. A positive
`max_queue_delay` lets a batch that is not full wait that much longer for company.

A batch runs in a worker thread (onnxruntime releases the GIL), so the event
loop keeps accepting, decoding and answering calls meanwhile: every waiting
call is in this queue, where load shedding, deadlines and cancellation apply.
With `run_lone_inline` (the server sets it on the CPU), a lone image with
nobody else waiting runs on the loop itself, since handing it to the thread and
back takes longer than the model does (about 0.1 ms); and when the batcher is
idle (nothing queued, no batch running) it runs right in the caller's `submit`,
without the queue's two task switches. On a CPU that is the common case even
under load: gRPC hands calls to the loop one at a time, and the loop's per-call
work takes longer than the model, so there is rarely company to wait for
(measured at 32 callers x 1 image: 1.15 images per batch with or without the
thread). On a GPU a run takes long enough that the loop should accept calls
meanwhile, so every batch goes to the thread and calls that arrive during it
form the next batch.
(Running every batch on the loop was measured too: on 2 cores a few per cent
faster, but it left waiting calls in gRPC's own queues, beyond shedding and
draining.)

A thread that finishes a batch takes the next one itself while calls wait (a chain of batches),
instead of handing the answers to the loop and waiting for the loop to hand it the next batch:
under load the loop is busy receiving calls, and each such round trip left the thread idle.
Measured at 8 callers x 64 images from one connection (2 cores, one worker busy, batches on one
onnxruntime thread each): 1.1-1.6 ms idle per 2.7 ms batch with the round trip, each inference
thread busy 0.69-0.74 of the time. The loop still answers every call (one wake-up per batch).

Two exceptions use the cores that other --workers leave idle (`parallel`, the
number of batches that may run at once now; serving.inference.activity):
- a lone image leaves the loop for the thread when the loop itself is the
  bottleneck (its thread on the CPU LOOP_SATURATED of the time: one client
  connection, which the kernel gives to one worker) and a core is free, so the
  model runs beside the loop's per-call work instead of after it;
- while a batch runs, another starts at once when a full batch is waiting, each
  on its own thread, instead of waiting its turn.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving import tracing
from serving.inference.errors import DeadlinePassed, QueueFull, ShuttingDown


class BatchObserver(Protocol):
    """Where the batcher reports what it does (the server plugs Prometheus metrics in)."""

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None: ...
    def batch_finished(self, images: int, seconds: float) -> None: ...
    def request_dropped(self, reason: str) -> None: ...
    def queue_depth(self, requests: int) -> None: ...


class _NoObserver:
    def batch_started(self, images: int, requests: int, waits: list[float]) -> None: ...
    def batch_finished(self, images: int, seconds: float) -> None: ...
    def request_dropped(self, reason: str) -> None: ...
    def queue_depth(self, requests: int) -> None: ...


# Measured on 2 cores (make bench, 1 x 1 and 32 x 1 from one connection): the loop's thread is on
# the CPU 0.58-0.64 of the time at 1 x 1 (it waits for the client between calls; the model is
# best run inline there) and 0.91 at 32 x 1 (the loop is the bottleneck).
LOOP_SATURATED = 0.8


class LoopLoad:
    """The share of wall time the event loop's thread spent on the CPU lately (thread_time/wall).

    Sampled from the loop's own thread (DynamicBatcher.submit), at most once per WINDOW. Where
    other processes take the cores it reads low, and the batcher keeps lone images inline, as it
    does anyway on a crowded machine (serving.inference.activity).
    """

    WINDOW = 0.05

    def __init__(
        self,
        cpu: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clocks = cpu, wall
        self._cpu, self._wall = cpu(), wall()
        self.busy = 0.0

    def sample(self) -> float:
        cpu_clock, wall_clock = self._clocks
        now = wall_clock()
        if now - self._wall >= self.WINDOW:
            cpu = cpu_clock()
            self.busy = (cpu - self._cpu) / (now - self._wall)
            self._wall, self._cpu = now, cpu
        return self.busy


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() after which the answer is useless
    trace: tuple | None = None  # the call's span context and arrival (serving.tracing): sampled


class DynamicBatcher:
    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 64,
        max_queue_delay: float = 0.0,
        max_queue_size: int = 1024,
        observer: BatchObserver | None = None,
        run_lone_inline: bool = True,
        parallel: Callable[[], int] | None = None,
        loop_load: LoopLoad | None = None,
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.run_lone_inline = run_lone_inline
        self._observer = observer or _NoObserver()
        self._queue: deque[_Pending] = deque()
        # The queue is taken from by the loop and by inference threads (chains of batches):
        # appends, takes and the image count change under this lock.
        self._queue_lock = threading.Lock()
        self._queued = 0  # images in the queue
        self._arrived = asyncio.Event()
        self._parallel = parallel
        threads = 1 if parallel is None else max(1, len(os.sched_getaffinity(0)))
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._running = 0  # batches being run (on the loop or in the threads)
        self._batches: set[asyncio.Future] = set()  # batch tasks, and lone images' thread runs
        self._loop_load = loop_load or LoopLoad()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue `images` [n, ...] (n ≤ max_batch_size) and return the model's outputs for them."""
        if self._closing:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if len(self._queue) >= self.max_queue_size:
            self._observer.request_dropped("queue_full")
            raise QueueFull(
                f"the request queue is full ({self.max_queue_size} requests waiting); retry with backoff"
            )
        if len(images) > self.max_batch_size:
            raise ValueError(
                f"{len(images)} images exceed the batch limit of {self.max_batch_size}"
            )
        if len(images) == 1 and self.run_lone_inline and self._idle():
            if self._inline_pays():
                return self._run_alone(images, deadline)
            return await self._run_alone_in_thread(images, deadline)
        future = asyncio.get_running_loop().create_future()
        trace = tracing.queued() if tracing.on else None
        with self._queue_lock:
            self._queue.append(_Pending(images, future, time.monotonic(), deadline, trace))
            self._queued += len(images)
        self._observer.queue_depth(len(self._queue))
        if not self._running or self._may_start():
            # Else waking the worker would only show it that nothing may start yet: the running
            # batch's end wakes it (_batch_done, _alone_done), or the chain takes this call.
            # Measured at 32 x 1 from one connection (the loop is the bottleneck there), old and
            # new code alternating, 3 rounds: the loop's CPU per call 0.40-0.54 ms against
            # 0.47-0.56, 8-21 % more calls/s in each round (a machine with steal time: noisy).
            self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: the batcher will skip this request
            raise

    def _slots(self) -> int:
        return 1 if self._parallel is None else max(1, self._parallel())

    def _inline_pays(self) -> bool:
        """Whether a lone image should run on the loop: unless the loop is saturated and a core free."""
        if self._parallel is None or self._loop_load.sample() < LOOP_SATURATED:
            return True
        return self._slots() <= 1

    def _idle(self) -> bool:
        """Running, with nothing queued or running, and no --max-queue-delay asking to wait for company."""
        return (
            not self._queue
            and not self._running
            and self.max_queue_delay <= 0
            and self._worker is not None
        )

    def _run_alone(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """A batch of one request, run at once on the caller's turn of the loop (the batcher is idle)."""
        if deadline is not None and deadline <= time.monotonic():
            self._observer.request_dropped("deadline")
            raise DeadlinePassed("the deadline passed before the request could run")
        self._observer.batch_started(len(images), 1, [0.0])
        started = time.monotonic()
        if tracing.on:
            outputs = self._traced([tracing.queued()], images, self._infer)
        else:
            outputs = self._infer(images)
        self._observer.batch_finished(len(images), time.monotonic() - started)
        return outputs

    async def _run_alone_in_thread(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """A batch of one request, run in a thread straight from the caller's task (the loop is busy).

        The queue's path would add the worker's and the batch task's turns of the loop, a future and
        the queue's bookkeeping to the thread's round trip (measured at 32 callers x 1 image from one
        connection, where most lone images leave the loop: 2.6 % more calls/s, within the noise of
        such runs). Calls that arrive meanwhile queue, and the worker runs them as the next batch
        once this one is done.
        """
        if deadline is not None and deadline <= time.monotonic():
            self._observer.request_dropped("deadline")
            raise DeadlinePassed("the deadline passed before the request could run")
        self._observer.batch_started(len(images), 1, [0.0])
        infer = self._infer
        if tracing.on:
            calls = [tracing.queued()]
            infer = lambda images: self._traced(calls, images, self._infer)  # noqa: E731
        self._running += 1
        run = asyncio.get_running_loop().run_in_executor(self._executor, infer, images)
        started = time.monotonic()
        # Done (answered or failed) when the thread is, whatever happens to the caller meanwhile;
        # close() waits for it as for the batches.
        self._batches.add(run)
        run.add_done_callback(lambda run: self._alone_done(run, len(images), started))
        return await asyncio.shield(run)  # a caller that goes away does not end the run early

    def _alone_done(self, run: asyncio.Future, images: int, started: float) -> None:
        self._batches.discard(run)
        self._running -= 1
        if not run.cancelled() and run.exception() is None:
            self._observer.batch_finished(images, time.monotonic() - started)
        if self._queue:
            self._arrived.set()  # the worker runs what queued meanwhile

    @staticmethod
    def _traced(
        calls: list, images: np.ndarray, infer: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """infer(images) inside the batch's spans (serving.tracing), on the calling thread."""
        batch = tracing.start_batch(calls, len(images))
        if batch is None:  # none of its calls is sampled
            return infer(images)
        try:
            outputs = batch.run(infer, images)
        except BaseException as error:
            batch.end(error)
            raise
        batch.end()
        return outputs

    async def close(self) -> None:
        """Refuse new work, finish every queued and running batch, then stop the worker."""
        self._closing = True
        self._arrived.set()  # wake an idle worker so that it sees the queue is done
        if self._worker:
            await self._worker
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or not self._may_start():
                if self._closing and not self._queue:
                    return  # close() waits for the batches still running
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.max_queue_delay > 0 and not self._closing and not self._running:
                await self._wait_for_company()
            batch = self._take_batch(self._expire)
            if not batch:
                continue
            self._running += 1
            if self._parallel is None:  # one batch at a time: run it (and its chain) here
                try:
                    await self._run_chain(batch, loop)
                finally:
                    self._running -= 1
                continue
            task = loop.create_task(self._run_chain(batch, loop))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _may_start(self, others: int | None = None) -> bool:
        """Nothing else runs, or a full batch waits and another core is free for it (`others`:
        the batches running besides the one to start; default: all that run)."""
        others = self._running if others is None else others
        if not others:
            return True
        return others < self._slots() and self._queued >= self.max_batch_size

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        self._running -= 1
        self._arrived.set()  # the worker may start the next batch

    async def _run_chain(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        """Run `batch`, then, in the same thread, the batches that queued meanwhile (_chain)."""
        if (
            len(batch) == 1
            and len(batch[0].images) == 1
            and self.run_lone_inline
            and not self._queue
            and self._running == 1
            and self._inline_pays()
        ):
            # A lone image on an idle server: the thread hand-off would cost more than the model.
            self._answer(batch, *self._compute(batch))
            return
        await loop.run_in_executor(self._executor, self._chain, batch, loop)

    def _chain(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        """On an inference thread: run batches until none may follow; the loop answers each."""
        expire = lambda pending: loop.call_soon_threadsafe(self._expire, pending)  # noqa: E731
        while batch:
            loop.call_soon_threadsafe(self._answer, batch, *self._compute(batch))
            batch = self._take_batch(expire) if self._may_follow() else []

    def _may_follow(self) -> bool:
        """Whether a thread that finished a batch takes the next: as the worker would start it
        (_may_start, with this chain's slot free), and never a partial batch that
        --max-queue-delay asks to wait for company (the worker waits for it)."""
        if not self._queue:
            return False
        if self.max_queue_delay > 0 and self._queued < self.max_batch_size and not self._closing:
            return False
        return self._may_start(others=self._running - 1)

    def _compute(self, batch: list[_Pending]) -> tuple[np.ndarray | None, Exception | None]:
        """Run one batch (on the loop or a thread): its outputs, or the error its callers get."""
        started = time.monotonic()
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        self._observer.batch_started(len(images), len(batch), [started - p.enqueued for p in batch])
        try:
            if tracing.on:
                outputs = self._traced([p.trace for p in batch], images, self._infer)
            else:
                outputs = self._infer(images)
        except Exception as err:  # noqa: BLE001 - the failure belongs to the callers, not the worker
            return None, err
        self._observer.batch_finished(len(images), time.monotonic() - started)
        return outputs, None

    @staticmethod
    def _answer(batch: list[_Pending], outputs: np.ndarray | None, error: Exception | None) -> None:
        """On the loop: each caller's share of the outputs, or the batch's error."""
        offset = 0
        for pending in batch:
            count = len(pending.images)
            if not pending.future.done():  # its caller may have gone meanwhile
                if error is not None:
                    pending.future.set_exception(error)
                else:
                    pending.future.set_result(outputs[offset : offset + count])
            offset += count

    @staticmethod
    def _expire(pending: _Pending) -> None:
        """On the loop: a request whose deadline passed while it was queued."""
        if not pending.future.done():
            pending.future.set_exception(
                DeadlinePassed("the deadline passed while the request was queued")
            )

    async def _wait_for_company(self) -> None:
        """Hold a partial batch until it fills or its oldest request has waited max_queue_delay."""
        oldest = self._queue[0].enqueued
        while self._queued < self.max_batch_size:
            remaining = oldest + self.max_queue_delay - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self, expire: Callable[[_Pending], None]) -> list[_Pending]:
        """Pop requests in arrival order while they fit; drop the cancelled and the expired
        (`expire` fails an expired one's caller, from the loop)."""
        batch: list[_Pending] = []
        size = 0
        now = time.monotonic()
        with self._queue_lock:
            while self._queue:
                pending = self._queue[0]
                if pending.future.done():  # cancelled by its caller while queued
                    self._pop()
                    self._observer.request_dropped("cancelled")
                    continue
                if pending.deadline is not None and pending.deadline <= now:
                    self._pop()
                    expire(pending)
                    self._observer.request_dropped("deadline")
                    continue
                if size + len(pending.images) > self.max_batch_size:
                    break
                batch.append(self._pop())
                size += len(pending.images)
            depth = len(self._queue)
        self._observer.queue_depth(depth)
        return batch

    def _pop(self) -> _Pending:
        pending = self._queue.popleft()
        self._queued -= len(pending.images)
        return pending
