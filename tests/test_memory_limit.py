"""The server image under a container memory limit: `docker run --memory 512m`, the default
workers (one per core), 4x its capacity offered in 64-image calls on the gRPC and the REST ports.

It must shed (RESOURCE_EXHAUSTED / 429), answer every admitted call correctly, and never be
OOM-killed. A gRPC connection past --grpc-max-concurrent-streams calls in flight has the excess
refused by grpc core (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the caller): never processed and
retryable (serving.client retries it), so it counts as shed, in a count of its own: `docker inspect` says OOMKilled false, 0 restarts, still running, still answering.
The RSS of each server process is sampled from this machine's /proc (a container's processes
are this kernel's) and printed: the ceiling per worker that docs/reliability.md reports.

Runs when a Docker engine answers `docker info`; outside CI it skips with one line otherwise,
under CI=true it fails instead (.ci/run starts the engine), as tests/test_containers.py does.
The server image is built from a clean checkout of HEAD, as there; with that module's images in
the layer cache the build takes seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from serving.memory import tree_rss_by_process

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() == "true"
LIMIT = "512m"
LIMIT_BYTES = 512 * 2**20
IMAGES_PER_CALL = 64
OVERLOAD = 4.0
SECONDS = 20

pytestmark = pytest.mark.timeout(2400)  # a cold build (the legacy builder builds every stage)


def _docker(
    *args: str, timeout: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` got no answer in 30 s"
    return None if info.returncode == 0 else "no Docker engine answers `docker info`"


@pytest.fixture(scope="module")
def server_image():
    """The server image (Dockerfile target `server`) built from HEAD's committed files."""
    problem = _engine_problem()
    if problem:
        message = (
            f"{problem}: the memory-limit test needs a Docker engine "
            "(Debian: apt-get install docker.io)"
        )
        if CI:
            pytest.fail(message + "; under CI=true it must run")
        pytest.skip(message)
    checkout = Path(tempfile.mkdtemp(prefix="mnist-memory-limit-"))
    tag = f"mnist-memory-limit:{uuid.uuid4().hex[:8]}"
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True
        )
        assert archive.returncode == 0, archive.stderr.decode()[-500:]
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(checkout, filter="data")
        base = subprocess.run(
            ["sh", "docker/build-standin-base.sh"],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert base.returncode == 0, f"docker/build-standin-base.sh: {base.stderr[-3000:]}"
        build = subprocess.run(
            ["docker", "build", "-q", "--target", "server", "-t", tag, "."],
            cwd=checkout,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            capture_output=True,
            text=True,
            timeout=2100,
        )
        assert build.returncode == 0, f"docker build --target server:\n{build.stderr[-4000:]}"
        yield tag
    finally:
        _docker("rmi", "--no-prune", tag, check=False, timeout=300)
        shutil.rmtree(checkout, ignore_errors=True)


@pytest.fixture()
def models(trained_repository, tmp_path) -> Path:
    """The test model, readable by the image's user (uid 1000)."""
    copy = tmp_path / "models"
    shutil.copytree(trained_repository, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    return copy


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


def _rest_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
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


def _refused(error) -> bool:
    """grpc core's words for a stream the server refused before any handler saw it (HTTP/2 code 7)."""
    return "RST_STREAM" in (error.details() or "") and "error code 7" in error.details()


async def _open_loop(
    grpc_target: str,
    http_url: str,
    grpc_calls,
    rest_call,
    rate: float,
    seconds: float,
    reference: np.ndarray,
) -> dict[str, int]:
    """`rate` calls/s for `seconds`, alternating gRPC Classify and REST infer, on a schedule."""
    import aiohttp
    import grpc

    from bench.overload import CLASSIFY
    from serving.generated import mnist_classifier_pb2 as pb

    counts = {"grpc_ok": 0, "grpc_shed": 0, "grpc_refused": 0, "rest_ok": 0, "rest_shed": 0}
    counts["wrong"] = 0
    other: list[str] = []
    channels = [grpc.aio.insecure_channel(grpc_target) for _ in range(4)]
    stubs = [
        c.unary_unary(CLASSIFY, response_deserializer=pb.ClassifyResponse.FromString)
        for c in channels
    ]
    body, headers = rest_call
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one_grpc(i: int) -> None:
            data, index = grpc_calls[i % len(grpc_calls)]
            try:
                response = await stubs[i % len(stubs)](data, timeout=60)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    counts["grpc_shed"] += 1
                elif error.code() == grpc.StatusCode.UNAVAILABLE and _refused(error):
                    counts["grpc_refused"] += 1
                else:
                    other.append(f"gRPC {error.code().name}: {error.details()}")
                return
            counts["grpc_ok"] += 1
            counts["wrong"] += int(
                (np.array([p.label for p in response.predictions]) != reference[index]).sum()
            )

        async def one_rest() -> None:
            try:
                async with session.post(
                    f"{http_url}/v2/models/mnist/infer", data=body, headers=headers
                ) as answer:
                    await answer.read()
                    if answer.status == 200:
                        counts["rest_ok"] += 1
                    elif answer.status == 429:
                        counts["rest_shed"] += 1
                    else:
                        other.append(f"REST {answer.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                other.append(f"REST {type(error).__name__}: {error}")

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one_grpc(i) if i % 2 == 0 else one_rest()))
        await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    counts["other"] = len(other)
    counts["other_examples"] = other[:5]  # type: ignore[assignment]
    return counts


def test_512mb_container_sheds_at_4x_overload_and_is_never_oom_killed(
    server_image, models, mnist_test_set
):
    from bench.overload import closed_loop, requests
    from serving.client import ClassifierClient
    from serving.process import free_port, wait_until_serving

    images, _ = mnist_test_set
    pool = np.ascontiguousarray(images[:2048])
    grpc_port, http_port = free_port(), free_port()
    name = f"mnist-memory-limit-{uuid.uuid4().hex[:8]}"
    _docker(
        "run",
        "-d",
        "--name",
        name,
        "--memory",
        LIMIT,
        "--memory-swap",
        LIMIT,
        "-p",
        f"127.0.0.1:{grpc_port}:8500",
        "-p",
        f"127.0.0.1:{http_port}:8000",
        "-v",
        f"{models}:/models:ro",
        server_image,
        "mnist-serve",
        "--model-repository",
        "/models",
        "--port",
        "8500",
        "--http-port",
        "8000",
        "--metrics-port",
        "0",
        "--device",
        "cpu",
    )
    try:
        target, http_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        wait_until_serving(target, 180)
        pid = int(_docker("inspect", "-f", "{{.State.Pid}}", name).stdout)
        with ClassifierClient(target, timeout=60) as client:
            reference = np.concatenate(
                [client.classify(pool[i : i + 64]).labels for i in range(0, len(pool), 64)]
            )
        grpc_calls = requests(pool, IMAGES_PER_CALL, 256)
        rest_call = _rest_body(pool[:IMAGES_PER_CALL])
        idle = sum(tree_rss_by_process(pid).values())
        with Sampler(pid) as sampler:
            capacity = asyncio.run(closed_loop(target, grpc_calls, 16, 5))
            counts = asyncio.run(
                _open_loop(
                    target, http_url, grpc_calls, rest_call, OVERLOAD * capacity, SECONDS, reference
                )
            )
        state = json.loads(_docker("inspect", name).stdout)[0]
        with ClassifierClient(target, timeout=60) as client:  # still answering, correctly
            after = client.classify(pool[:64]).labels
        processes = len(tree_rss_by_process(pid))
    finally:
        logs = subprocess.run(
            ["docker", "logs", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        ).stdout
        _docker("rm", "-f", name, check=False)
    print(
        f"\n{LIMIT} container, {processes} processes: capacity {capacity:.0f} calls/s of "
        f"{IMAGES_PER_CALL} images; "
        f"offered {OVERLOAD:g}x for {SECONDS} s: {counts}; RSS idle {idle / 2**20:.0f} MiB, max "
        f"{sampler.total_max / 2**20:.0f} MiB summed, largest process "
        f"{sampler.worker_max / 2**20:.0f} MiB"
    )
    # The defaults fitted to the limit (serving.memory.fit_to_memory_limit), in one line.
    assert f"memory limit {LIMIT_BYTES >> 20} MiB" in logs and "--max-queue-size" in logs, logs[
        -3000:
    ]
    assert state["State"]["OOMKilled"] is False and state["RestartCount"] == 0, (
        state["State"],
        logs[-3000:],
    )
    assert state["State"]["Running"] is True, logs[-3000:]
    assert counts["other"] == 0, counts["other_examples"]
    assert counts["wrong"] == 0
    assert counts["grpc_ok"] and counts["rest_ok"], counts
    assert counts["grpc_shed"] and counts["rest_shed"], counts  # overloaded: both ports shed
    assert np.array_equal(after, reference[:64])
    assert sampler.total_max < LIMIT_BYTES


def test_default_workers_and_queue_fit_a_memory_limit() -> None:
    from serving.config import load_config
    from serving.memory import (
        BYTES_PER_QUEUED_IMAGE,
        PARENT_BYTES,
        WORKER_BYTES,
        fit_to_memory_limit,
    )
    from serving.workers import resolve

    config = resolve(load_config([]), cores=16)  # 16 workers of a 1024-call queue each: GBs
    assert config.workers == 16 and config.max_queue_size == 1024
    fitted, line = fit_to_memory_limit(
        config, workers_auto=True, queue_auto=True, limit=LIMIT_BYTES
    )
    per_call = fitted.max_batch_size * BYTES_PER_QUEUED_IMAGE
    assert fitted.workers == 2 and 8 <= fitted.max_queue_size < 64, fitted
    held = PARENT_BYTES + fitted.workers * (WORKER_BYTES + fitted.max_queue_size * per_call)
    assert held <= 0.8 * LIMIT_BYTES, held >> 20
    assert (
        line.startswith("memory limit 512 MiB: 2 worker(s), --max-queue-size") and "\n" not in line
    )
    # What an operator sets stays; with no limit, nothing changes.
    kept, _ = fit_to_memory_limit(config, workers_auto=False, queue_auto=False, limit=LIMIT_BYTES)
    assert (kept.workers, kept.max_queue_size) == (16, 1024)
    roomy, _ = fit_to_memory_limit(resolve(load_config([]), cores=2), True, True, limit=64 * 2**30)
    assert (roomy.workers, roomy.max_queue_size) == (2, 1024)
