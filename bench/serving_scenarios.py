"""make bench's scenarios and how one is measured: callers x images per call over one connection
or several, KServe v2 ModelInfer FP32 requests, alternating slices between the servers, and each
server's figures (calls/s, images/s, p50/p99, CPU time per call, its own and the load generator's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.common import Sample, cpu_seconds, measure, merge, percentile_ms
from core.contract import IMAGE_SHAPE, INPUT_NAME, to_model_input


@dataclass(frozen=True)
class Scenario:
    callers: int
    images: int  # per call
    connections: int

    @property
    def label(self) -> str:
        return f"{self.callers} x {self.images}, {self.connections} conn"

    @property
    def key(self) -> str:
        """How --scenario names it: 32x1/8 is 32 callers x 1 image over 8 connections."""
        return f"{self.callers}x{self.images}/{self.connections}"


SCENARIOS = (
    Scenario(1, 1, 1),
    Scenario(32, 1, 1),
    Scenario(32, 1, 8),
    Scenario(8, 64, 1),
    Scenario(8, 64, 8),
)
# only gRPC is measured; several servers run at once
QUIET_PORTS = ("--metrics-port", "0", "--http-port", "0")
NAIVE, CANNED, SERVE, SERVE_INT8 = "naive", "canned", "mnist-serve", "serve-int8"
INLINE = "aio-inline"  # bench/inline_server.py: grpc.aio running the model inline per call


@dataclass
class Result:
    target: str
    callers: int
    images_per_call: int
    connections: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms_per_call: float  # CPU time of the server's processes (all threads) per call
    client_cpu_ms_per_call: float  # the load generator's (this process's) CPU time per call


def infer_payload(images: np.ndarray, model_name: str) -> bytes:
    """One serialized ModelInfer request: FP32 [n, 28, 28, 1] in raw_input_contents."""
    batch = to_model_input(images)
    # The message class from whichever file registered `inference.*` (tritonclient's or ours).
    from serving.client import _kserve_message_types

    request = _kserve_message_types()[0](model_name=model_name)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[len(batch), *IMAGE_SHAPE])
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request.SerializeToString()


def summarize(
    name: str,
    scenario: Scenario,
    sample: Sample,
    server_cpu: float = float("nan"),
    client_cpu: float = float("nan"),
) -> Result:
    calls = len(sample.latencies) or 1
    rps = sample.calls_per_s
    return Result(
        name,
        scenario.callers,
        scenario.images,
        scenario.connections,
        rps,
        rps * scenario.images,
        percentile_ms(sample.latencies, 50),
        percentile_ms(sample.latencies, 99),
        sample.errors,
        1000 * server_cpu / calls,
        1000 * client_cpu / calls,
    )


def compare(
    targets: dict[str, tuple[str, bytes, int | None]],
    scenario: Scenario,
    rounds: int,
    seconds: float,
    between_rounds: Callable[[], None] = lambda: None,
    generator: Callable[..., Sample] = measure,
) -> list[Result]:
    """Alternate short slices between the servers, so the machine's drifts hit all of them alike.

    `targets`: name -> (address, serialized request, server pid or None); `between_rounds` runs
    after each round (the in-process ceilings, so that they are interleaved with the servers too);
    `generator`: bench.common's measure (this process) or measure_with_tritonclient.
    """
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    server_cpu = dict.fromkeys(targets, 0.0)
    client_cpu = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, (target, payload, pid) in targets.items():
            marks: list[float] = []  # the server's CPU s as the window opens and closes
            sample = generator(
                target,
                payload,
                callers=scenario.callers,
                connections=scenario.connections,
                seconds=seconds,
                on_window=lambda pid=pid: marks.append(cpu_seconds(pid)),
            )
            samples[name].append(sample)
            server_cpu[name] += marks[1] - marks[0]
            client_cpu[name] += sample.client_cpu_s
        between_rounds()
    return [
        summarize(name, scenario, merge(parts), server_cpu[name], client_cpu[name])
        for name, parts in samples.items()
    ]
