"""Per model-version inference statistics, counted the way Triton's ModelStatistics reports them.

Triton's meanings, kept here so that perf_analyzer and model_analyzer read the same numbers:
- inference_count: images computed (Triton: batch elements); execution_count: onnxruntime runs.
- success / fail: requests answered or failed, with the time from entering the model core to
  the answer (Triton: request duration).
- queue: requests' waits in the batching queue.
- compute_input / compute_infer / compute_output: per request, the batch's time to prepare the
  input tensor, to run the model, and to hand the outputs back (Triton adds a batch's durations
  to every request in it, so the sums grow with the requests, not the batches).
Counters are updated from the event loop and from the inference thread, hence the lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass
class BatchDurations:
    """Triton's InferBatchStatistics: per batch size, how many runs and their durations."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class InferenceStats:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def request_done(self, seconds: float, ok: bool) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(seconds)
            if ok:
                self.last_inference_ms = int(time.time() * 1000)

    def queued(self, waits: list[float]) -> None:
        with self._lock:
            for wait in waits:
                self.queue.add(wait)

    def batch_computed(
        self, images: int, requests: int, input_s: float, infer_s: float, output_s: float
    ) -> None:
        with self._lock:
            self.inference_count += images
            self.execution_count += 1
            self.compute_input.add(input_s, requests)
            self.compute_infer.add(infer_s, requests)
            self.compute_output.add(output_s, requests)
            per_size = self.batches.setdefault(images, BatchDurations())
            per_size.compute_input.add(input_s)
            per_size.compute_infer.add(infer_s)
            per_size.compute_output.add(output_s)

    def snapshot(self) -> InferenceStats:
        """A consistent copy to report from."""
        with self._lock:
            copy = InferenceStats(
                self.inference_count,
                self.execution_count,
                self.last_inference_ms,
                *(
                    Duration(d.count, d.ns)
                    for d in (
                        self.success,
                        self.fail,
                        self.queue,
                        self.compute_input,
                        self.compute_infer,
                        self.compute_output,
                    )
                ),
                batches={
                    size: BatchDurations(
                        *(
                            Duration(d.count, d.ns)
                            for d in (b.compute_input, b.compute_infer, b.compute_output)
                        )
                    )
                    for size, b in self.batches.items()
                },
            )
        return copy
