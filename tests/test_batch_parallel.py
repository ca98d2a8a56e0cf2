"""The batcher on the cores other --workers leave idle (DynamicBatcher's `parallel`).

A full batch waiting while another runs starts at once on a second thread; a partial one waits and
coalesces, as with one thread. A lone image runs on the loop unless the loop is saturated and a
core is free. Real threads, real blocking functions; each test waits on the model's own signals.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from serving.inference import activity
from serving.inference.batcher import LOOP_SATURATED, DynamicBatcher, LoopLoad

HANG = 30.0  # only against a hung batcher


class GatedModel:
    """Blocks each run until the test opens the gate; records batch sizes and overlap."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.started = threading.Semaphore(0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.sizes.append(len(images))
            self.threads.add(threading.current_thread().name)
        self.started.release()
        assert self.gate.wait(HANG), "the test never opened the gate"
        with self.lock:
            self.running -= 1
        return images.reshape(len(images), -1)[:, :10] * 2


def _images(first: int, count: int) -> np.ndarray:
    return np.arange(first, first + count * 784, dtype=np.float32).reshape(count, 28, 28, 1)


async def _wait_started(model: GatedModel, runs: int) -> None:
    for _ in range(runs):
        assert await asyncio.to_thread(model.started.acquire, True, HANG)


def _expected(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)[:, :10] * 2


def test_full_batches_run_side_by_side_up_to_the_free_cores() -> None:
    async def scenario() -> GatedModel:
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=4, parallel=lambda: 2)
        batcher.start()
        calls = [_images(k * 10_000, 4) for k in range(3)]
        tasks = [asyncio.ensure_future(batcher.submit(c)) for c in calls]
        await _wait_started(model, 2)  # two full batches at once; the third waits for a slot
        assert model.running == 2 and len(model.sizes) == 2
        model.gate.set()
        answers = await asyncio.gather(*tasks)
        for call, answer in zip(calls, answers, strict=True):
            np.testing.assert_array_equal(answer, _expected(call))
        await batcher.close()
        return model

    model = asyncio.run(scenario())
    assert model.most_at_once == 2 and model.sizes == [4, 4, 4] and len(model.threads) == 2


def test_one_slot_keeps_one_batch_at_a_time() -> None:
    async def scenario() -> GatedModel:
        model = GatedModel()
        model.gate.set()
        batcher = DynamicBatcher(model, max_batch_size=4, parallel=lambda: 1)
        batcher.start()
        await asyncio.gather(*(batcher.submit(_images(k, 4)) for k in range(6)))
        await batcher.close()
        return model

    assert asyncio.run(scenario()).most_at_once == 1


def test_a_partial_batch_waits_for_the_running_one_and_coalesces() -> None:
    async def scenario() -> GatedModel:
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=4, parallel=lambda: 2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_images(0, 4)))
        await _wait_started(model, 1)
        # Two images wait: not a full batch, so no second thread; they go together afterwards.
        rest = [asyncio.ensure_future(batcher.submit(_images(k * 7_000, 1))) for k in (1, 2)]
        await asyncio.sleep(0.05)
        assert model.sizes == [4]
        model.gate.set()
        await asyncio.gather(first, *rest)
        await batcher.close()
        return model

    assert asyncio.run(scenario()).sizes == [4, 2]


def test_close_waits_for_every_batch_still_running() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=4, parallel=lambda: 2)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(_images(k * 5_000, 4))) for k in range(2)]
        await _wait_started(model, 2)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # both batches are still inside the model
        model.gate.set()
        await closing
        assert all(t.done() and t.exception() is None for t in tasks)

    asyncio.run(scenario())


class Clocks:
    """The CPU and wall clocks LoopLoad reads, moved by the test (the arithmetic, not the host)."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    def spend(self, seconds: float, busy: float) -> None:
        self.wall += seconds
        self.cpu += seconds * busy


def test_loop_load_is_the_share_of_wall_time_on_the_cpu_per_window() -> None:
    clocks = Clocks()
    load = LoopLoad(lambda: clocks.cpu, lambda: clocks.wall)
    clocks.spend(LoopLoad.WINDOW * 2, busy=0.95)
    assert load.sample() > LOOP_SATURATED
    clocks.spend(LoopLoad.WINDOW / 4, busy=0.0)
    assert load.sample() > LOOP_SATURATED  # within a window the last figure stands
    clocks.spend(LoopLoad.WINDOW * 2, busy=0.3)
    assert load.sample() == pytest.approx(0.3 * 2 / 2.25)  # the quarter window idle counts too
    # On this host's real clocks, a thread that sleeps is not on the CPU.
    real = LoopLoad()
    time.sleep(LoopLoad.WINDOW * 1.5)
    assert real.sample() < 0.5


def test_a_lone_image_leaves_a_saturated_loop_only_for_a_free_core() -> None:
    """Inline (on the loop's thread) when idle or when no core is free; on a thread otherwise."""

    async def where_it_ran(slots: int, busy: float) -> str:
        ran_on: list[str] = []

        def model(images: np.ndarray) -> np.ndarray:
            ran_on.append(threading.current_thread().name)
            return images.reshape(len(images), -1)[:, :10]

        clocks = Clocks()
        load = LoopLoad(lambda: clocks.cpu, lambda: clocks.wall)
        batcher = DynamicBatcher(model, max_batch_size=4, parallel=lambda: slots, loop_load=load)
        batcher.start()
        clocks.spend(LoopLoad.WINDOW * 2, busy)
        await batcher.submit(_images(0, 1))
        await batcher.close()
        return ran_on[0]

    main = threading.current_thread().name
    assert asyncio.run(where_it_ran(2, busy=0.6)) == main  # 1 x 1: the loop waits for its client
    assert asyncio.run(where_it_ran(1, busy=0.95)) == main  # saturated, but no core is free
    assert asyncio.run(where_it_ran(2, busy=0.95)).startswith("inference")


def test_a_worker_is_busy_on_the_board_from_its_first_run_to_its_last() -> None:
    board = [-math.inf, -math.inf]
    mine, other = activity.WorkerActivity(board, 0), activity.WorkerActivity(board, 1)
    mine.started()
    mine.started()
    mine.finished()
    assert board[0] == math.inf and not other.others_idle()
    mine.finished()
    assert board[0] < math.inf


class Recorder:
    """A BatchObserver that keeps what the batcher reported."""

    def __init__(self) -> None:
        self.started: list[tuple[int, int]] = []
        self.finished: list[int] = []
        self.dropped: list[str] = []

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        self.started.append((images, requests))

    def batch_finished(self, images: int, seconds: float) -> None:
        self.finished.append(images)

    def request_dropped(self, reason: str) -> None:
        self.dropped.append(reason)

    def queue_depth(self, requests: int) -> None: ...


def _saturated(model, observer=None) -> DynamicBatcher:
    """A batcher whose loop reads as saturated, with a second core free: lone images leave it."""
    clocks = Clocks()
    load = LoopLoad(lambda: clocks.cpu, lambda: clocks.wall)
    clocks.spend(LoopLoad.WINDOW * 2, busy=0.95)
    return DynamicBatcher(
        model, max_batch_size=4, parallel=lambda: 2, loop_load=load, observer=observer
    )


async def _lone_image_running() -> tuple[GatedModel, Recorder, DynamicBatcher, asyncio.Future]:
    """A saturated batcher whose lone image 0 is inside the (gated) model, on its thread."""
    model, observer = GatedModel(), Recorder()
    batcher = _saturated(model, observer)
    batcher.start()
    lone = asyncio.ensure_future(batcher.submit(_images(0, 1)))
    await _wait_started(model, 1)
    return model, observer, batcher, lone


def test_a_lone_image_in_the_thread_is_a_batch_and_later_calls_form_the_next() -> None:
    async def scenario() -> tuple[GatedModel, Recorder]:
        model, observer, batcher, lone = await _lone_image_running()
        # Arrivals while it runs queue (it counts as the running batch) and go together after it.
        rest = [asyncio.ensure_future(batcher.submit(_images(k * 3_000, 1))) for k in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert model.sizes == [1] and not lone.done()
        model.gate.set()
        np.testing.assert_array_equal(await lone, _expected(_images(0, 1)))
        for k, task in zip((1, 2, 3), rest, strict=True):
            np.testing.assert_array_equal(await task, _expected(_images(k * 3_000, 1)))
        await batcher.close()
        return model, observer

    model, observer = asyncio.run(scenario())
    assert model.sizes == [1, 3] and all(t.startswith("inference") for t in model.threads)
    assert observer.started == [(1, 1), (3, 3)] and observer.finished == [1, 3]


def test_a_lone_image_in_the_thread_survives_its_caller_and_close_waits_for_it() -> None:
    async def scenario() -> tuple[GatedModel, Recorder]:
        model, observer, batcher, gone = await _lone_image_running()
        gone.cancel()  # the caller goes away: the run goes on, and still counts as running
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit(_images(5_000, 1)))
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        assert model.sizes == [1] and not closing.done() and not waiting.done()
        model.gate.set()
        await closing
        np.testing.assert_array_equal(await waiting, _expected(_images(5_000, 1)))
        assert gone.cancelled()
        return model, observer

    model, observer = asyncio.run(scenario())
    assert model.sizes == [1, 1] and observer.finished == [1, 1]


def test_a_failing_lone_image_in_the_thread_fails_its_caller_only() -> None:
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("the model broke")

    async def scenario() -> None:
        batcher = _saturated(broken)
        batcher.start()
        with pytest.raises(RuntimeError, match="the model broke"):
            await batcher.submit(_images(0, 1))
        with pytest.raises(RuntimeError, match="the model broke"):  # the next one runs too
            await batcher.submit(_images(0, 1))
        await batcher.close()  # the failures were the callers'; closing raises nothing

    asyncio.run(scenario())
