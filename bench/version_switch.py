"""Latency before, during and after a hot version switch, under load.

A polling mnist-serve serves a copy of the repository's `mnist` version; 32 callers (half KServe
v2 ModelInfer over gRPC, half KServe v2 REST with binary tensor data, one real MNIST digit per
call, back to back) run throughout. After --before seconds a new version is published the way
mnist-train publishes (staged folder renamed into place). Reported per phase: calls, failures,
p50 and p99, and which versions answered; and how long the switch took:

  before  -- from the start of the measured window to the publication
  during  -- from the publication until the new version answers every call (poll wait + checks + warm-up)
  after   -- the --after seconds that follow

The load generator shares the machine with the server: on a small machine compare the phases
with each other, not with other benchmarks.

    python -m bench.version_switch --model-repository model_repository
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from bench.common import percentile_ms, test_images
from core.contract import IMAGE_SHAPE, INPUT_NAME
from core.repository import METADATA_FILENAME, list_versions
from serving.process import start_server


@dataclass
class Call:
    started: float  # time.monotonic()
    seconds: float
    version: str  # "" when the call failed
    api: str


def publish_copy(repository: Path, name: str) -> int:
    """Publish the newest version's files again as the next version, atomically; return its number."""
    versions = list_versions(repository, name)
    source, number = repository / name / str(versions[-1]), versions[-1] + 1
    staging = repository / name / f".staging-{number}"
    shutil.copytree(source, staging)
    metadata = json.loads((staging / METADATA_FILENAME).read_text())
    metadata["version"] = number
    (staging / METADATA_FILENAME).write_text(json.dumps(metadata))
    staging.rename(repository / name / str(number))
    return number


async def grpc_caller(
    target: str, images: np.ndarray, calls: list[Call], stop: asyncio.Event, seed: int
) -> None:
    from serving.generated import grpc_predict_v2_pb2 as pb

    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        while not stop.is_set():
            request = pb.ModelInferRequest(model_name="mnist")
            request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=[1, *IMAGE_SHAPE])
            request.raw_input_contents.append(images[rng.integers(len(images))].tobytes())
            started = time.monotonic()
            try:
                response = await infer(request, timeout=30)
                version = response.model_version
            except grpc.RpcError:
                version = ""
            calls.append(Call(started, time.monotonic() - started, version, "grpc"))


async def rest_caller(
    http_url: str, images: np.ndarray, calls: list[Call], stop: asyncio.Event, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    async with aiohttp.ClientSession(http_url) as session:
        while not stop.is_set():
            raw = images[rng.integers(len(images))].tobytes()
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": INPUT_NAME,
                            "datatype": "UINT8",
                            "shape": [1, *IMAGE_SHAPE],
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ]
                }
            ).encode()
            started = time.monotonic()
            try:
                async with session.post(
                    "/v2/models/mnist/infer",
                    data=header + raw,
                    headers={"Inference-Header-Content-Length": str(len(header))},
                ) as reply:
                    body = await reply.read()
                    length = int(reply.headers.get("Inference-Header-Content-Length", len(body)))
                    version = (
                        json.loads(body[:length])["model_version"] if reply.status == 200 else ""
                    )
            except aiohttp.ClientError:
                version = ""
            calls.append(Call(started, time.monotonic() - started, version, "rest"))


def percentiles(calls: list[Call]) -> str:
    ok = [c.seconds for c in calls if c.version]
    failed = sum(1 for c in calls if not c.version)
    versions = sorted({c.version for c in calls if c.version})
    if not len(ok):
        return f"{len(calls):6d} calls, {failed} failed"
    return (
        f"{len(calls):6d} calls, {failed} failed, p50 {percentile_ms(ok, 50):6.2f} ms, "
        f"p99 {percentile_ms(ok, 99):6.2f} ms, versions {', '.join(versions)}"
    )


async def wait_for_switch(calls: list[Call], new_version: int, published: float) -> float:
    """When the new version first answered, once every call started in the last 0.5 s was its."""
    while True:
        await asyncio.sleep(0.05)
        recent = [c for c in calls if c.started > time.monotonic() - 0.5 and c.version]
        if recent and all(c.version == str(new_version) for c in recent):
            return min(c.started for c in calls if c.version == str(new_version))
        if time.monotonic() - published > 120:
            raise SystemExit("the new version did not take over within 120 s; see the server log")


def print_phases(args, calls: list[Call], phases: dict, new_version: int, switched: float, log):
    published, settled = phases["during"]
    print(
        f"{args.callers} callers (KServe gRPC and REST, 1 digit per call), poll every {args.poll} s:"
    )
    for phase, (start, end) in phases.items():
        in_phase = [c for c in calls if start <= c.started < end]
        print(f"  {phase:7s} {end - start:5.1f} s: {percentiles(in_phase)}")
    print(
        f"  version {new_version} published -> first answer from it after "
        f"{switched - published:.2f} s; all answers from it after {settled - published:.2f} s"
    )
    loaded = [
        line
        for line in log.read_text().splitlines()
        if f"version {new_version} passed its checks" in line
    ]
    if loaded:
        print("  server: " + loaded[0].split("mnist-serve: ", 1)[-1])


async def run(
    args: argparse.Namespace, target: str, http_url: str, repository: Path, images: np.ndarray, log
) -> None:
    calls: list[Call] = []
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            grpc_caller(target, images, calls, stop, i)
            if i % 2 == 0
            else rest_caller(http_url, images, calls, stop, i)
        )
        for i in range(args.callers)
    ]
    await asyncio.sleep(args.warmup)
    window_start = time.monotonic()
    await asyncio.sleep(args.before)
    published = time.monotonic()
    new_version = await asyncio.to_thread(publish_copy, repository, "mnist")
    # "during" ends once every call that started since has been answered by the new version.
    switched = await wait_for_switch(calls, new_version, published)
    settled = time.monotonic()
    await asyncio.sleep(args.after)
    ended = time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    phases = {
        "before": (window_start, published),
        "during": (published, settled),
        "after": (settled, ended),
    }
    print_phases(args, calls, phases, new_version, switched, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument(
        "--poll", type=float, default=1.0, help="the server's --repository-poll-secs"
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--before", type=float, default=8.0)
    parser.add_argument("--after", type=float, default=8.0)
    parser.add_argument("--server-args", default="--workers 1", help="more mnist-serve flags")
    args = parser.parse_args(argv)
    images = test_images()[:2000]
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        shutil.copytree(args.model_repository / "mnist", repository / "mnist")
        log = Path(tmp) / "server.log"
        with start_server(
            repository,
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            str(args.poll),
            *args.server_args.split(),
            log_path=log,
        ) as server:
            asyncio.run(run(args, server.target, server.http_url, repository, images, log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
