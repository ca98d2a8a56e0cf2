"""Load for tests/test_memory_limit.py: calls offered on a schedule (open loop) to both ports of
one server, counted by outcome, and the RSS of a container's processes sampled meanwhile."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np

from serving.memory import tree_rss_by_process


class Sampler:
    """The RSS of every process of the container, twice a second, on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.worker_max = 0
        self.total_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            sizes = tree_rss_by_process(self.pid)
            if sizes:
                self.worker_max = max(self.worker_max, max(sizes.values()))
                self.total_max = max(self.total_max, sum(sizes.values()))


def rest_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 REST call with FP32 binary tensor data (Triton's extension): 200 kB a call."""
    raw = (images.astype(np.float32) / 255.0).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(images), 28, 28, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def refused(error) -> bool:
    """grpc core's words for a stream the server refused before any handler saw it (HTTP/2
    code 7)."""
    return "RST_STREAM" in (error.details() or "") and "error code 7" in error.details()


class OpenLoop:
    """One run's callers and counts: gRPC Classify on 4 channels, REST infer on one session."""

    def __init__(self, grpc_target, http_url, grpc_calls, rest_call, reference) -> None:
        self.grpc_target, self.http_url = grpc_target, http_url
        self.grpc_calls, self.rest_call, self.reference = grpc_calls, rest_call, reference
        self.counts = {"grpc_ok": 0, "grpc_shed": 0, "grpc_refused": 0, "rest_ok": 0}
        self.counts.update({"rest_shed": 0, "wrong": 0})
        self.other: list[str] = []

    async def one_grpc(self, stubs, i: int) -> None:
        import grpc

        data, index = self.grpc_calls[i % len(self.grpc_calls)]
        try:
            response = await stubs[i % len(stubs)](data, timeout=60)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.counts["grpc_shed"] += 1
            elif error.code() == grpc.StatusCode.UNAVAILABLE and refused(error):
                self.counts["grpc_refused"] += 1
            else:
                self.other.append(f"gRPC {error.code().name}: {error.details()}")
            return
        self.counts["grpc_ok"] += 1
        labels = np.array([p.label for p in response.predictions])
        self.counts["wrong"] += int((labels != self.reference[index]).sum())

    async def one_rest(self, session) -> None:
        import aiohttp

        body, headers = self.rest_call
        try:
            url = f"{self.http_url}/v2/models/mnist/infer"
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                if answer.status == 200:
                    self.counts["rest_ok"] += 1
                elif answer.status == 429:
                    self.counts["rest_shed"] += 1
                else:
                    self.other.append(f"REST {answer.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            self.other.append(f"REST {type(error).__name__}: {error}")

    async def run(self, rate: float, seconds: float) -> dict[str, int]:
        """`rate` calls/s for `seconds`, alternating gRPC Classify and REST infer, on a schedule."""
        import aiohttp
        import grpc

        from bench.overload import CLASSIFY
        from serving.generated import mnist_classifier_pb2 as pb

        channels = [grpc.aio.insecure_channel(self.grpc_target) for _ in range(4)]
        stubs = [
            c.unary_unary(CLASSIFY, response_deserializer=pb.ClassifyResponse.FromString)
            for c in channels
        ]
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            tasks = []
            start = time.monotonic()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                call = self.one_grpc(stubs, i) if i % 2 == 0 else self.one_rest(session)
                tasks.append(asyncio.ensure_future(call))
            await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
        counts = dict(self.counts)
        counts["other"] = len(self.other)
        counts["other_examples"] = self.other[:5]  # type: ignore[assignment]
        return counts
