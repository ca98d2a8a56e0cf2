"""The dynamic batcher alone: arrays in, arrays out, no gRPC and no ONNX.

No sleeps and no clocks: each test waits for the state it needs (a batch blocked inside the
model, requests in the queue) through the model's and the observer's own signals.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.inference.batcher import DynamicBatcher
from serving.inference.errors import DeadlinePassed, QueueFull, ShuttingDown

# Only against a hung batcher; nothing here is a speed check (bench/ measures speed).
HANG = 30.0


class RecordingModel:
    """A real blocking function (the batcher runs it in its worker thread) that remembers its batches.

    With a gate, each call first says it has started (`entered`), then blocks until the gate opens.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.entered = threading.Event()
        self.batches: list[np.ndarray] = []
        self.threads: list[str] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(HANG), "the test never opened the gate"
        self.batches.append(images.copy())
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True) * np.ones((1, 10))

    async def running(self) -> None:
        """Until a batch is inside the model (blocked at the gate, in the worker thread)."""
        assert await asyncio.to_thread(self.entered.wait, HANG), "no batch reached the model"


class RecordingObserver:
    """The batcher's observer: remembers what it reports."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.dropped: list[str] = []
        self.batches: list[tuple[int, int]] = []  # (images, requests)

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        self.batches.append((images, requests))

    def batch_finished(self, images: int, seconds: float) -> None: ...

    def request_dropped(self, reason: str) -> None:
        self.dropped.append(reason)

    def queue_depth(self, requests: int) -> None:
        self.depths.append(requests)


async def queued(*calls: asyncio.Future) -> None:
    """Let freshly created submit() tasks run up to their wait: then each is in the queue.

    submit() appends to the queue before its first await, so one pass of the loop suffices.
    """
    await asyncio.sleep(0)
    assert not any(call.done() for call in calls), "a call finished before the test looked"


def batch_of(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 28, 28, 1), value, dtype=np.float32)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, HANG))


def test_a_lone_request_runs_at_once_on_the_loop_without_a_queue_delay():
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=64, max_queue_delay=0.0)
        batcher.start()
        out = await batcher.submit(batch_of(1.0))
        await batcher.close()
        return model, out

    model, out = run(scenario())
    assert [len(b) for b in model.batches] == [1]
    assert out.shape == (1, 10) and out[0, 0] == 784.0
    assert model.threads == [threading.main_thread().name]  # no hand-off, no timer: run in place


def test_without_run_lone_inline_a_lone_request_runs_in_the_worker_thread():
    # The GPU's setting: the loop stays free to accept the calls that will form the next batch.
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=64, run_lone_inline=False)
        batcher.start()
        out = await batcher.submit(batch_of(1.0))
        await batcher.close()
        return model, out

    model, out = run(scenario())
    assert out[0, 0] == 784.0 and model.threads != [threading.main_thread().name]


def test_a_lone_request_behind_a_running_batch_queues_and_joins_the_next_one():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate)
        batcher = DynamicBatcher(model, max_batch_size=64)
        batcher.start()
        running = asyncio.ensure_future(
            batcher.submit(batch_of(1.0, count=2))
        )  # 2 images: the thread
        await model.running()
        lone = [asyncio.ensure_future(batcher.submit(batch_of(2.0))) for _ in range(3)]
        await queued(*lone)  # the batcher is busy: no fast path, they wait in the queue
        gate.set()
        outs = await asyncio.gather(running, *lone)
        await batcher.close()
        return model, outs

    model, outs = run(scenario())
    assert [len(b) for b in model.batches] == [2, 3]
    assert all(out[0, 0] == 2 * 784.0 for out in outs[1:])


def test_a_full_batch_does_not_wait_for_the_queue_delay_cap():
    async def scenario():
        model = RecordingModel()
        # A cap longer than the test's hang guard: the call can only finish if the full batch skips it.
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay=10 * HANG)
        batcher.start()
        out = await batcher.submit(batch_of(1.0, count=4))
        await batcher.close()
        return model, out

    model, out = run(scenario())
    assert [len(b) for b in model.batches] == [4] and out.shape == (4, 10)


def test_a_partial_batch_waits_for_company_until_it_fills():
    async def scenario():
        model = RecordingModel()
        observer = RecordingObserver()
        batcher = DynamicBatcher(
            model, max_batch_size=3, max_queue_delay=10 * HANG, observer=observer
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(batch_of(1.0)))
        await queued(first)
        await asyncio.sleep(0)  # the worker is now holding the partial batch for company
        assert not first.done() and model.batches == []
        second = asyncio.ensure_future(
            batcher.submit(batch_of(2.0, count=2))
        )  # fills it: 1 + 2 = 3
        outs = await asyncio.gather(first, second)
        await batcher.close()
        return model, observer, outs

    model, observer, (first, second) = run(scenario())
    assert [len(b) for b in model.batches] == [
        3
    ]  # the first request waited and took the second along
    assert observer.batches == [(3, 2)]
    assert first[0, 0] == 784.0 and second[:, 0].tolist() == [2 * 784.0] * 2


def test_a_partial_batch_waits_no_longer_than_the_cap():
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=64, max_queue_delay=0.05)
        batcher.start()
        out = await batcher.submit(
            batch_of(1.0)
        )  # nobody comes: the cap, not a full batch, ends the wait
        await batcher.close()
        return model, out

    model, out = run(scenario())
    assert [len(b) for b in model.batches] == [1] and out[0, 0] == 784.0


def test_requests_queued_during_a_batch_are_coalesced_and_answered_in_order():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, max_batch_size=64, observer=observer)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(batch_of(0.0, count=2)))
        await model.running()  # the first batch is blocked inside the model, in the worker thread
        rest = [
            asyncio.ensure_future(batcher.submit(batch_of(i / 100, count=i % 3 + 1)))
            for i in range(1, 21)
        ]
        await queued(*rest)
        assert observer.depths[-1] == 20
        gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return model, observer, results

    model, observer, results = run(scenario())
    assert [len(b) for b in model.batches] == [2, sum(i % 3 + 1 for i in range(1, 21))]
    assert [requests for _, requests in observer.batches] == [1, 20]
    for i, out in enumerate(results[1:], start=1):
        assert out.shape == (i % 3 + 1, 10)
        np.testing.assert_allclose(
            out[:, 0], 784 * i / 100, rtol=1e-5
        )  # each caller gets its own rows


def test_batches_never_exceed_the_limit():
    async def scenario():
        gate = threading.Event()
        gate.set()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=8)
        calls = [asyncio.ensure_future(batcher.submit(batch_of(1.0, count=3))) for _ in range(10)]
        await queued(*calls)  # all ten wait before the worker starts
        batcher.start()
        await asyncio.gather(*calls)
        await batcher.close()
        return model

    model = run(scenario())
    assert [len(b) for b in model.batches] == [6, 6, 6, 6, 6]  # 3 + 3 fit in 8; a third would not


def test_a_full_queue_sheds_load_at_once():
    async def scenario():
        gate = threading.Event()
        observer = RecordingObserver()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=2, max_queue_size=2, observer=observer)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(batch_of(1.0, count=2)))
        await model.running()
        queued_calls = [
            asyncio.ensure_future(batcher.submit(batch_of(1.0, count=2))) for _ in range(2)
        ]
        await queued(*queued_calls)
        with pytest.raises(
            QueueFull, match=r"the request queue is full \(2 requests waiting\); retry with backoff"
        ):
            await batcher.submit(batch_of(1.0, count=2))
        gate.set()
        await asyncio.gather(running, *queued_calls)
        await batcher.close()
        return observer

    assert run(scenario()).dropped == ["queue_full"]


def test_expired_and_cancelled_requests_are_dropped_not_computed():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, max_batch_size=64, observer=observer)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(batch_of(0.0, count=2)))
        await model.running()
        expired = asyncio.ensure_future(
            batcher.submit(batch_of(5.0), deadline=time.monotonic() - 1)
        )
        cancelled = asyncio.ensure_future(batcher.submit(batch_of(7.0)))
        alive = asyncio.ensure_future(
            batcher.submit(batch_of(9.0), deadline=time.monotonic() + 10 * HANG)
        )
        await queued(expired, cancelled, alive)
        cancelled.cancel()
        gate.set()
        await blocker
        with pytest.raises(
            DeadlinePassed, match="the deadline passed while the request was queued"
        ):
            await expired
        assert (await alive)[0, 0] == pytest.approx(784 * 9.0)
        await batcher.close()
        return model, observer

    model, observer = run(scenario())
    computed = {float(image[0, 0, 0]) for batch in model.batches for image in batch}
    assert computed == {0.0, 9.0}
    assert sorted(observer.dropped) == ["cancelled", "deadline"]


def test_a_failing_model_fails_its_callers_and_the_batcher_goes_on():
    class FlakyModel(RecordingModel):
        def __call__(self, images):
            if images[0, 0, 0, 0] < 0:
                raise RuntimeError("bad batch")
            return super().__call__(images)

    async def scenario():
        batcher = DynamicBatcher(FlakyModel(), max_batch_size=64)
        batcher.start()
        with pytest.raises(RuntimeError, match="bad batch"):
            await batcher.submit(batch_of(-1.0))
        out = await batcher.submit(batch_of(1.0))
        await batcher.close()
        with pytest.raises(ShuttingDown, match="shutting down"):
            await batcher.submit(batch_of(1.0))
        return out

    assert run(scenario())[0, 0] == 784.0


def test_a_lone_image_runs_on_the_loop_and_batches_in_the_worker_thread():
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=64)
        batcher.start()
        await batcher.submit(batch_of(1.0))
        await batcher.submit(batch_of(1.0, count=2))
        await batcher.close()
        return model.threads

    on_loop, in_worker = run(scenario())
    assert on_loop == threading.main_thread().name and in_worker.startswith("inference")


def test_the_thread_that_finishes_a_batch_starts_the_next_one_while_the_loop_is_busy():
    """A chain of batches: what queued during a batch runs next on the same inference thread,
    with no turn of the event loop in between (the loop is blocked here while it starts)."""

    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(batch_of(1.0, count=2)))
        await model.running()
        second = asyncio.ensure_future(batcher.submit(batch_of(2.0, count=2)))
        await queued(first, second)
        model.entered.clear()
        gate.set()
        # Blocking the loop: only the thread itself can take the second batch now.
        assert model.entered.wait(HANG), "the second batch waited for the event loop"
        answers = await asyncio.gather(first, second)
        await batcher.close()
        return model, answers

    model, (first, second) = run(scenario())
    assert len(set(model.threads)) == 1 and model.threads[0].startswith("inference")
    assert [len(b) for b in model.batches] == [2, 2]
    np.testing.assert_array_equal(first[:, 0], [784.0, 784.0])
    np.testing.assert_array_equal(second[:, 0], [2 * 784.0, 2 * 784.0])


def test_close_answers_everything_queued_and_running_before_it_returns():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=4)
        batcher.start()
        calls = [
            asyncio.ensure_future(batcher.submit(batch_of(float(i), count=2))) for i in range(6)
        ]
        await model.running()  # the first batch is running, the rest are queued
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)  # close() has begun: new work is refused from here on
        with pytest.raises(ShuttingDown):
            await batcher.submit(batch_of(1.0))
        assert not closing.done() and not any(call.done() for call in calls)
        gate.set()
        await closing
        return [call.result() for call in calls]

    results = run(scenario())
    assert [float(out[0, 0]) for out in results] == [784.0 * i for i in range(6)]
