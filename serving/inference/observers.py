"""Who hears of a model's lifecycle and of each version's batches.

The registry reports loads, unloads and refusals to a LifecycleObserver (the server plugs
Prometheus in: serving.metrics.PrometheusLifecycleObserver). Each served version's batcher
reports to a VersionObserver, which feeds the version's own statistics (Triton's
ModelStatistics) and forwards to the server's batch observer; `timed_infer` is the batcher's
infer function, timing Triton's compute_input / compute_infer / compute_output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from serving.inference.batcher import BatchObserver
from serving.inference.stats import InferenceStats


class LifecycleObserver(Protocol):
    """Where the registry reports loads, unloads and refusals (the server plugs Prometheus in)."""

    def batch_observer(self, name: str, version: int, queue_capacity: int) -> BatchObserver: ...
    def version_loaded(self, name: str, version: int, provider: str) -> None: ...
    def version_unloaded(self, name: str, version: int, provider: str) -> None: ...
    def load_failed(self, name: str, reason: str) -> None: ...


class NoLifecycleObserver:
    """The observer of a registry nobody watches (in-process tests, tools)."""

    def batch_observer(self, name: str, version: int, queue_capacity: int) -> BatchObserver | None:
        return None

    def version_loaded(self, name: str, version: int, provider: str) -> None: ...
    def version_unloaded(self, name: str, version: int, provider: str) -> None: ...
    def load_failed(self, name: str, reason: str) -> None: ...


class VersionObserver:
    """Forwards the batcher's reports to the server's observer; feeds the version's statistics."""

    def __init__(self, stats: InferenceStats, outer: BatchObserver | None) -> None:
        self.stats = stats
        self.outer = outer
        self.requests_in_batch = 1

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        self.requests_in_batch = requests
        self.stats.queued(waits)
        if self.outer:
            self.outer.batch_started(images, requests, waits)

    def batch_finished(self, images: int, seconds: float) -> None:
        if self.outer:
            self.outer.batch_finished(images, seconds)

    def request_dropped(self, reason: str) -> None:
        if self.outer:
            self.outer.request_dropped(reason)

    def queue_depth(self, requests: int) -> None:
        if self.outer:
            self.outer.queue_depth(requests)


def timed_infer(
    run: Callable[[np.ndarray], np.ndarray], observer: VersionObserver, stats: InferenceStats
) -> Callable[[np.ndarray], np.ndarray]:
    """The batcher's infer function, timing Triton's compute_input, _infer, _output."""

    def infer(images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        # The input tensor onnxruntime reads.
        tensor = np.ascontiguousarray(images, dtype=np.float32)
        ready = time.perf_counter()
        outputs = run(tensor)
        computed = time.perf_counter()
        # The outputs, as the batcher hands them back.
        outputs = np.asarray(outputs, dtype=np.float32)
        done = time.perf_counter()
        stats.batch_computed(
            len(images),
            observer.requests_in_batch,
            ready - started,
            computed - ready,
            done - computed,
        )
        return outputs

    return infer
