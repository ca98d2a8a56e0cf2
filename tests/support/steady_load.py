"""Steady callers through the swarm's entry point while something happens to the cluster: every
call counted, failed or answered (by which model version, how fast)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from tests.support.swarm_cluster import ENTRY, Swarm

CALLERS = 16
STEADY_S = 6  # load before and after each event


@dataclass
class LoadResult:
    ok: int
    failed: int
    errors: list[str]
    latencies_ms: list[float]
    versions: dict[str, int]
    seconds: float

    @property
    def calls_per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")


class SteadyLoad:
    """CALLERS threads, each with its own client (the project's, with its retries) to the entry
    point, calling Classify on one real MNIST test digit after another until stopped."""

    def __init__(self, images: np.ndarray, callers: int = CALLERS) -> None:
        self.images = images
        self.callers = callers
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.versions: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}  # version -> when it last answered (monotonic)
        self.threads = [
            threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(callers)
        ]

    def _caller(self, index: int) -> None:
        from serving.client import ClassifierClient

        with ClassifierClient(ENTRY, timeout=10) as client:
            position = index
            while not self.stop_event.is_set():
                image = self.images[position % len(self.images)][None, ..., None] / np.float32(255)
                position += self.callers
                started = time.perf_counter()
                try:
                    answer = client.classify(image.astype(np.float32))
                except Exception as error:  # noqa: BLE001  (every failure is counted and shown)
                    with self.lock:
                        self.errors.append(f"{type(error).__name__}: {str(error)[:200]}")
                    continue
                elapsed = (time.perf_counter() - started) * 1000
                with self.lock:
                    self.ok += 1
                    self.latencies.append(elapsed)
                    self.versions[answer.model_version] = (
                        self.versions.get(answer.model_version, 0) + 1
                    )
                    self.last_seen[answer.model_version] = time.monotonic()

    def __enter__(self) -> SteadyLoad:  # noqa: PYI034  (final in practice)
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.seconds = time.monotonic() - self.started

    def result(self) -> LoadResult:
        with self.lock:
            return LoadResult(
                self.ok,
                len(self.errors),
                list(self.errors[:20]),
                list(self.latencies),
                dict(self.versions),
                getattr(self, "seconds", time.monotonic() - self.started),
            )


def under_load(swarm: Swarm, name: str, event) -> LoadResult:
    """Steady callers for STEADY_S, then `event(swarm)` (it waits for its outcome), then STEADY_S."""
    with SteadyLoad(swarm.seen["images"]) as load:
        time.sleep(STEADY_S)
        started = time.monotonic()
        try:
            event(swarm)
        finally:
            swarm.figures[f"{name}_event_s"] = f"{time.monotonic() - started:.0f}"
            time.sleep(STEADY_S)
    return record(swarm, name, load.result())


def record(swarm: Swarm, name: str, result: LoadResult) -> LoadResult:
    """The load's result kept for the tests, and its calls, failures and p99 as figures."""
    swarm.seen[name] = result
    swarm.figures[f"{name}_calls"] = str(result.ok)
    swarm.figures[f"{name}_failed"] = str(result.failed)
    swarm.figures[f"{name}_p99_ms"] = f"{result.p99_ms:.0f}"
    return result


# --- the scenario ---------------------------------------------------------------------------------
