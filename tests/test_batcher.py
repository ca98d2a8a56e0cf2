"""The dynamic batcher alone: arrays in, arrays out, no gRPC and no ONNX."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.inference.batcher import DynamicBatcher
from serving.inference.errors import DeadlinePassed, QueueFull, ShuttingDown


class RecordingModel:
    """A real blocking function (the batcher runs it in its worker thread) that remembers its batches."""

    def __init__(self, seconds: float = 0.0, gate: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.gate = gate
        self.batches: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.seconds)
        self.batches.append(images.copy())
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True) * np.ones((1, 10))


def batch_of(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 28, 28, 1), value, dtype=np.float32)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_lone_request_runs_at_once_even_with_a_queue_delay_cap():
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=64, max_queue_delay=0.0)
        batcher.start()
        started = time.perf_counter()
        out = await batcher.submit(batch_of(1.0))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return model, out, elapsed

    model, out, elapsed = run(scenario())
    assert [len(b) for b in model.batches] == [1]
    assert out.shape == (1, 10) and out[0, 0] == 784.0
    assert elapsed < 0.5  # no timer involved; generous bound only against a hung batcher


def test_requests_queued_during_a_batch_are_coalesced_and_answered_in_order():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=64)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(batch_of(0.0, count=2)))
        await asyncio.sleep(0.05)  # the first batch is now blocked inside the model, in the worker thread
        rest = [asyncio.ensure_future(batcher.submit(batch_of(i / 100, count=i % 3 + 1))) for i in range(1, 21)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return model, results

    model, results = run(scenario())
    assert [len(b) for b in model.batches] == [2, sum(i % 3 + 1 for i in range(1, 21))]
    for i, out in enumerate(results[1:], start=1):
        assert out.shape == (i % 3 + 1, 10)
        np.testing.assert_allclose(out[:, 0], 784 * i / 100, rtol=1e-5)  # each caller gets its own rows


def test_batches_never_exceed_the_limit():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=8)
        batcher.start()
        calls = [asyncio.ensure_future(batcher.submit(batch_of(1.0, count=3))) for _ in range(10)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*calls)
        await batcher.close()
        return model

    model = run(scenario())
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 30 and max(sizes) <= 8 and max(sizes) == 6


def test_queue_delay_waits_for_company_but_not_longer_than_the_cap():
    async def scenario():
        model = RecordingModel()
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay=0.2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(batch_of(1.0)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(batch_of(2.0)))
        started = time.perf_counter()
        await asyncio.gather(first, second)
        waited = time.perf_counter() - started
        await batcher.close()
        return model, waited

    model, waited = run(scenario())
    assert [len(b) for b in model.batches] == [2]  # the first request waited and took the second along
    assert waited < 1.0


def test_a_full_queue_sheds_load_at_once():
    async def scenario():
        gate = threading.Event()
        batcher = DynamicBatcher(RecordingModel(gate=gate), max_batch_size=2, max_queue_size=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(batch_of(1.0, count=2)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(batch_of(1.0, count=2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(batch_of(1.0, count=2))
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    run(scenario())


def test_expired_and_cancelled_requests_are_dropped_not_computed():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=64)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(batch_of(0.0, count=2)))
        await asyncio.sleep(0.05)
        expired = asyncio.ensure_future(batcher.submit(batch_of(5.0), deadline=time.monotonic() + 0.01))
        cancelled = asyncio.ensure_future(batcher.submit(batch_of(7.0)))
        alive = asyncio.ensure_future(batcher.submit(batch_of(9.0)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.set()
        await blocker
        with pytest.raises(DeadlinePassed):
            await expired
        assert (await alive)[0, 0] == pytest.approx(784 * 9.0)
        await batcher.close()
        return model

    model = run(scenario())
    computed = {float(image[0, 0, 0]) for batch in model.batches for image in batch}
    assert computed == {0.0, 9.0}


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
        with pytest.raises(ShuttingDown):
            await batcher.submit(batch_of(1.0))
        return out

    assert run(scenario())[0, 0] == 784.0



def test_a_lone_image_runs_on_the_loop_and_batches_in_the_worker_thread():
    class ThreadRecorder(RecordingModel):
        threads: list[str] = []

        def __call__(self, images):
            self.threads.append(threading.current_thread().name)
            return super().__call__(images)

    async def scenario():
        model = ThreadRecorder()
        batcher = DynamicBatcher(model, max_batch_size=64)
        batcher.start()
        await batcher.submit(batch_of(1.0))
        await batcher.submit(batch_of(1.0, count=2))
        await batcher.close()
        return model.threads

    on_loop, in_worker = run(scenario())
    assert on_loop == threading.main_thread().name and in_worker.startswith("inference")


def test_close_answers_everything_queued_and_running_before_it_returns():
    async def scenario():
        gate = threading.Event()
        model = RecordingModel(gate=gate)
        batcher = DynamicBatcher(model, max_batch_size=4)
        batcher.start()
        calls = [asyncio.ensure_future(batcher.submit(batch_of(float(i), count=2))) for i in range(6)]
        await asyncio.sleep(0.05)  # the first batch is running, the rest are queued
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):
            await batcher.submit(batch_of(1.0))
        gate.set()
        await closing
        return [call.result() for call in calls]

    results = run(scenario())
    assert [float(out[0, 0]) for out in results] == [784.0 * i for i in range(6)]
