"""What every bench script shares: a closed-loop load generator, percentiles, RSS, CPU, a table.

The load generator is grpc.aio in this process: `callers` coroutines send back-to-back calls of one
serialized request (bytes in, bytes out: no protobuf work in the measured loop) over `connections`
channels. One connection is how gRPC recommends a client to call (one channel); with SO_REUSEPORT
the kernel gives that connection to one server worker. Many connections: each channel gets its
own TCP connection (a local subchannel pool; gRPC shares one otherwise) and the callers are spread
over them round-robin, as a gateway or a fleet of clients would. Both are measured, because a
server's speed must not depend on how its callers connect.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.memory import rss_bytes, tree_rss_by_process  # the one reader of /proc's RSS

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "/mnist.v1.Classifier/Classify"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    """One closed-loop measurement: the successful calls' latencies (s) in the window, errors.

    `shed` counts the errors that were RESOURCE_EXHAUSTED (the server refusing load), a part of
    `errors`.
    """

    latencies: tuple[float, ...]
    errors: int
    seconds: float  # the measured window
    shed: int = 0
    client_cpu_s: float = float("nan")  # the load generator's CPU time over the window

    @property
    def calls_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def percentile_ms(latencies: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of latencies in seconds, in ms; nan if there are none."""
    return float(np.percentile(latencies, q) * 1000) if len(latencies) else float("nan")


def merge(samples: Sequence[Sample]) -> Sample:
    """Several slices of one measurement (interleaved rounds) as one sample."""
    return Sample(
        tuple(x for s in samples for x in s.latencies),
        sum(s.errors for s in samples),
        sum(s.seconds for s in samples),
        sum(s.shed for s in samples),
        sum(s.client_cpu_s for s in samples),
    )


def spread(callers: int, connections: int) -> list[int]:
    """The connection each caller uses: round-robin over min(callers, connections) connections."""
    count = max(1, min(callers, connections))
    return [k % count for k in range(callers)]


def payload_cycles(payload: bytes | Sequence[bytes], callers: int) -> list[itertools.cycle]:
    """What each caller sends: the one payload, or caller k the payloads k, k + callers, …"""
    payloads = [payload] if isinstance(payload, bytes) else list(payload)
    return [itertools.cycle(payloads[k % len(payloads) :: callers]) for k in range(callers)]


async def closed_loop(
    target: str,
    payload: bytes | Sequence[bytes],
    *,
    callers: int,
    connections: int = 1,
    seconds: float,
    warmup: float = 0.3,
    method: str = MODEL_INFER,
    timeout: float = 30.0,
    on_window: Callable[[], None] | None = None,
) -> Sample:
    """`callers` coroutines sending `payload` to `method` back to back over `connections`.

    `payload` is one serialized request, or several that the callers take turns over. Calls that
    complete in the `seconds` after `warmup` are measured; `on_window` is called when that window
    opens and when it closes (e.g. to read CPU counters). Errors (any RPC status but OK) are
    counted, never raised.
    """
    import grpc

    # A local subchannel pool gives each channel its own TCP connection (else gRPC shares one).
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    uses = spread(callers, connections)
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(uses) + 1)]
    cycles = payload_cycles(payload, callers)
    latencies: list[float] = []
    errors = shed = 0
    try:
        stubs = [channel.unary_unary(method) for channel in channels]
        # Connect every channel first; a server that refuses is counted in the errors, not raised.
        connected = await asyncio.gather(
            *(stub(next(cycles[0]), timeout=timeout) for stub in stubs), return_exceptions=True
        )
        errors += sum(isinstance(reply, grpc.aio.AioRpcError) for reply in connected)
        measuring_from = time.perf_counter() + warmup
        until = measuring_from + seconds
        cpu: list[float] = []

        def window() -> None:
            cpu.append(time.process_time())
            if on_window is not None:
                on_window()

        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + warmup, window)

        async def caller(call, payloads: itertools.cycle) -> None:
            nonlocal errors, shed
            while (now := time.perf_counter()) < until:
                try:
                    await call(next(payloads), timeout=timeout)
                except grpc.aio.AioRpcError as error:
                    errors += 1
                    shed += error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    continue
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller(stubs[use], cycles[k]) for k, use in enumerate(uses)))
        window()
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    client_cpu = cpu[1] - cpu[0] if len(cpu) == 2 else float("nan")
    return Sample(tuple(latencies), errors, seconds, shed, client_cpu)


def measure(target: str, payload: bytes, **load) -> Sample:
    """closed_loop from synchronous code (a fresh event loop per measurement)."""
    return asyncio.run(closed_loop(target, payload, **load))


def measure_with_tritonclient(
    target: str,
    payload: bytes,
    *,
    callers: int,
    connections: int = 1,
    seconds: float,
    on_window: Callable[[], None] | None = None,
) -> Sample:
    """The same closed loop run by tritonclient.grpc.aio in its own process
    (bench/tritonclient_generator.py): `on_window` is called as that process reports its window
    opening and closing; its CPU time over the window is the load generator's."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".bin") as request:
        request.write(payload)
        request.flush()
        command = [sys.executable, "-m", "bench.tritonclient_generator", target]
        command += ["--payload", request.name, "--callers", str(callers)]
        command += ["--connections", str(connections), "--seconds", str(seconds)]
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as generator:
            figures = None
            for line in generator.stdout:
                if line.startswith("window-"):
                    if on_window is not None:
                        on_window()
                elif line.startswith("{"):
                    figures = json.loads(line)
        if generator.returncode or figures is None:
            raise RuntimeError(f"bench.tritonclient_generator exited {generator.returncode}")
    return Sample(
        tuple(figures["latencies"]),
        figures["errors"],
        figures["seconds"],
        client_cpu_s=figures["client_cpu_s"],
    )


async def rest_closed_loop(
    url: str,
    payload: tuple[bytes, dict[str, str]],
    *,
    callers: int,
    seconds: float,
    warmup: float = 0.3,
    connection_per_caller: bool = True,
    timeout: float | None = None,
) -> Sample:
    """closed_loop's twin over REST: `callers` coroutines POSTing (body, headers) to `url`.

    Each caller on its own keep-alive connection, or all sharing one aiohttp session (a pool).
    One call per caller is made before the window opens (connecting); answers other than 200 are
    counted as errors; a transport failure (refused, timed out) is raised.
    """
    import aiohttp

    body, headers = payload
    latencies: list[float] = []
    errors = 0
    timeouts = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}  # or aiohttp's
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1) if connection_per_caller else None, **timeouts
        )
        for _ in range(callers if connection_per_caller else 1)
    ]
    of_caller = [sessions[k % len(sessions)] for k in range(callers)]

    async def call(session: aiohttp.ClientSession) -> bool:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status == 200

    try:
        await asyncio.gather(*(call(session) for session in of_caller))
        measuring_from = time.perf_counter() + warmup
        until = measuring_from + seconds

        async def caller(session: aiohttp.ClientSession) -> None:
            nonlocal errors
            while (now := time.perf_counter()) < until:
                if not await call(session):
                    errors += 1
                    continue
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller(session) for session in of_caller))
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    return Sample(tuple(latencies), errors, seconds)


def start_module_server(stack: ExitStack, module: str, *args: str) -> tuple[str, int]:
    """`python -m <module> --port PORT *args` (the naive or canned server) on loopback, stopped
    when `stack` closes: (its target, its pid) once it serves."""
    from serving.process import free_port, wait_until_serving  # grpc: only when a server starts

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT)
    stack.callback(lambda: (proc.terminate(), proc.wait()))
    wait_until_serving(f"127.0.0.1:{port}", 30, proc)
    return f"127.0.0.1:{port}", proc.pid


def rss_mib(pid: int | None, children: bool = False) -> float:
    """Resident memory of `pid` (and, with `children`, of its descendants: the --workers) in MiB."""
    if pid is None:
        return float("nan")
    try:
        own = rss_bytes(pid)
    except OSError:  # gone
        return float("nan")
    return (sum(tree_rss_by_process(pid).values()) if children else own) / 2**20


def server_rss_mib(pid: int | None) -> float:
    """A server's RSS summed over all its processes (with --workers the parent loads no model)."""
    return rss_mib(pid, children=True)


def largest_process_rss_mib(pid: int | None) -> float:
    """The largest single process of a server (a worker): what one worker's limit must hold."""
    if pid is None or not Path(f"/proc/{pid}").exists():
        return float("nan")
    return max(tree_rss_by_process(pid).values(), default=0) / 2**20


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` and its descendants (the --workers), all threads."""
    if pid is None:
        return float("nan")
    import psutil  # with Locust (the loadtest extra), as `make bench` has it

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def table(
    rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]], min_width: int = 0
) -> str:
    """A side-by-side, fixed-width table: `columns` = (key, format spec), e.g. ("p50_ms", ".2f").

    The first column is left-aligned, the others right-aligned; nan prints as "-". `min_width`
    keeps columns aligned across tables printed one row at a time.
    """

    def cell(value: object, spec: str) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "-"
        return format(value, spec) if spec else str(value)

    cells = [[cell(row.get(key, ""), spec) for key, spec in columns] for row in rows]
    widths = [
        max([min_width, len(key), *(len(line[i]) for line in cells)])
        for i, (key, _) in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )

    header = line([key for key, _ in columns])
    return "\n".join([header, "-" * len(header), *(line(values) for values in cells)])


def test_images():
    """The MNIST test images (uint8 [10000, 28, 28]): MNIST_DATA_DIR, Debian's or ../shared."""
    from core.idx import find_data_dir, load_idx_dir

    return load_idx_dir(find_data_dir("mnist") or ROOT.parent / "shared/datasets/mnist").test_images


def add_local_server_flags(parser: argparse.ArgumentParser) -> None:
    """--workers, --model-repository, --data-dir: the server a script starts here, its images."""
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="the server's --workers (0: its default, one per core); RSS is summed over them",
    )
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX folder (default: $MNIST_DATA_DIR)"
    )


def require_test_images(parser: argparse.ArgumentParser, data_dir: str | None, count: int):
    """The first `count` MNIST test images from --data-dir or $MNIST_DATA_DIR; else a usage error."""
    from core.idx import find_data_dir, load_idx_dir

    folder = find_data_dir("mnist", data_dir)
    if folder is None:
        parser.error("the MNIST files are needed: pass --data-dir or set MNIST_DATA_DIR")
    return np.ascontiguousarray(load_idx_dir(folder).test_images[:count])


def idle_labels(classify: Callable, items: Sequence, step: int = 64) -> np.ndarray:
    """The server's answers for `items`, asked `step` at a time while idle: what later answers
    under load must equal. `classify` is e.g. ClassifierClient.classify or .classify_encoded."""
    return np.concatenate(
        [classify(items[i : i + step]).labels for i in range(0, len(items), step)]
    )
