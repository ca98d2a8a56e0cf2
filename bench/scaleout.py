"""Replicas on loopback behind one round_robin client: the parts tests/test_scaleout.py and the figures share.

    python -m bench.scaleout --model-repository model_repository [--seconds 10] [--callers 32]

prints calls/s through one client with 1 replica and with 3, and the latency percentiles while one
of 3 replicas drains after SIGTERM. Replicas listen on 127.0.0.1, 127.0.0.2, ... (all loopback on
Linux) on one port, the way pods behind a headless Service share a port on different IPs.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.common import idle_labels, percentile_ms, require_test_images
from serving.client import ClassifierClient
from serving.process import free_port, wait_until_serving


@dataclass
class Replica:
    """One `mnist-serve` process on `host:port`, its metrics on `host:metrics_port`."""

    proc: subprocess.Popen
    host: str
    port: int
    metrics_port: int
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def requests_total(self, method: str = "Classify") -> float:
        """mnist_requests_total summed over the methods whose name contains `method`, all codes."""
        text = (
            urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        return sum(
            float(value)
            for labels, value in re.findall(
                r"^mnist_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE
            )
            if method in labels
        )

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace")
            if self.log_path and self.log_path.exists()
            else ""
        )

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def launch_replica(
    repository: Path, host: str, port: int, *args: str, log_path: Path | None = None
) -> Replica:
    """Start mnist-serve on host:port (HTTP off); it is SERVING once wait_until_ready returns."""
    metrics_port = free_port()
    command = [
        sys.executable,
        "-m",
        "serving.cli",
        "--model-repository",
        str(repository),
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        "0",
        *args,
    ]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    return Replica(
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
        host,
        port,
        metrics_port,
        log_path,
    )


def wait_until_ready(replicas: list[Replica], timeout: float = 90) -> None:
    try:
        for replica in replicas:
            wait_until_serving(replica.address, timeout, replica.proc)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise


def start_replica(
    repository: Path, host: str, port: int, *args: str, log_path: Path | None = None
) -> Replica:
    """One replica, returned once SERVING."""
    replica = launch_replica(repository, host, port, *args, log_path=log_path)
    wait_until_ready([replica])
    return replica


def start_replicas(
    repository: Path, count: int, *args: str, port: int | None = None, log_dir: Path | None = None
) -> list[Replica]:
    """`count` replicas on 127.0.0.1, 127.0.0.2, ... and one port, started together, returned once SERVING."""
    port = port or free_port()
    replicas = [
        launch_replica(
            repository,
            f"127.0.0.{index + 1}",
            port,
            *args,
            log_path=log_dir / f"replica-{index + 1}.log" if log_dir else None,
        )
        for index in range(count)
    ]
    wait_until_ready(replicas)
    return replicas


def ipv4_target(replicas: list[Replica]) -> str:
    """gRPC's static list of addresses: one name for all replicas, resolved without DNS."""
    return "ipv4:" + ",".join(replica.address for replica in replicas)


@dataclass
class LoadResult:
    seconds: float
    samples: list[tuple[float, float]] = field(
        default_factory=list
    )  # (start, latency) of each successful call
    failures: list[str] = field(
        default_factory=list
    )  # status code or wrong answer, per failed call

    @property
    def calls_per_second(self) -> float:
        return len(self.samples) / self.seconds if self.seconds else 0.0

    def percentile(
        self, q: float, since: float = float("-inf"), until: float = float("inf")
    ) -> float:
        """Latency percentile (s) of the successful calls that started in [since, until) (perf_counter)."""
        latencies = [latency for start, latency in self.samples if since <= start < until]
        return percentile_ms(latencies, q) / 1000


class Load:
    """`callers` threads calling Classify back to back through one shared client (one channel)."""

    def __init__(
        self, client: ClassifierClient, images: np.ndarray, expected: np.ndarray, callers: int = 32
    ) -> None:
        self._client, self._images, self._expected = client, images, expected
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._call, args=(i,), daemon=True) for i in range(callers)
        ]
        self._started = 0.0
        self.result = LoadResult(0.0)

    def __enter__(self) -> Load:
        self._started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        if not self.result.seconds:
            self.result.seconds = time.perf_counter() - self._started
        return self.result

    def calls(self) -> int:
        with self._lock:
            return len(self.result.samples) + len(self.result.failures)

    def _call(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            i = (index * 7919 + n) % len(self._images)
            n += 1
            started = time.perf_counter()
            try:
                label = int(self._client.classify(self._images[i : i + 1]).labels[0])
                failure = (
                    None if label == self._expected[i] else f"wrong answer {label} for image {i}"
                )
            except grpc.RpcError as error:
                failure = f"{error.code().name}: {error.details()}"
            elapsed = time.perf_counter() - started
            with self._lock:
                if failure is None:
                    self.result.samples.append((started, elapsed))
                else:
                    self.result.failures.append(failure)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaleout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument(
        "--callers", type=int, default=32, help="concurrent callers sharing one client"
    )
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DATA_DIR)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="mnist-serve --workers of each replica (1: one process per replica, as one pod per core)",
    )
    return parser, parser.parse_args(argv)


def measure_scaling(replicas: list[Replica], images, expected, args) -> None:
    """Calls/s and latency through one client with 1 replica, then with 3."""
    for count in (1, 3):
        with ClassifierClient(ipv4_target(replicas[:count]), timeout=30) as client:
            with Load(client, images, expected, args.callers) as load:
                time.sleep(args.seconds)
            result = load.stop()
        print(
            f"{count} replica(s), {args.callers} callers: {result.calls_per_second:.0f} calls/s, "
            f"p50 {result.percentile(50) * 1e3:.1f} ms, p99 {result.percentile(99) * 1e3:.1f} ms, "
            f"{len(result.failures)} failed"
        )


def measure_drain(replicas: list[Replica], images, expected, args) -> None:
    """SIGTERM to one of 3 replicas halfway through the load: failures, p99 around it."""
    with ClassifierClient(ipv4_target(replicas), timeout=30) as client:
        with Load(client, images, expected, args.callers) as load:
            time.sleep(args.seconds / 2)
            sigterm_at = time.perf_counter()
            exit_code = replicas[0].stop()
            exited_at = time.perf_counter()
            time.sleep(args.seconds / 2)
        result = load.stop()
    print(
        f"SIGTERM to 1 of 3 replicas under load: it exited ({exit_code}) "
        f"{exited_at - sigterm_at:.2f} s later; "
        f"{len(result.failures)} failed of {len(result.samples) + len(result.failures)} calls; "
        f"p99 before {result.percentile(99, until=sigterm_at) * 1e3:.1f} ms, "
        f"while draining {result.percentile(99, sigterm_at, exited_at) * 1e3:.1f} ms, "
        f"after {result.percentile(99, since=exited_at) * 1e3:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    images = require_test_images(parser, args.data_dir, 1000)
    replicas = start_replicas(
        args.model_repository, 3, "--grace-period", "10", "--workers", str(args.workers)
    )
    try:
        with ClassifierClient(replicas[0].address, timeout=30) as client:
            expected = idle_labels(client.classify, images)
        measure_scaling(replicas, images, expected, args)
        measure_drain(replicas, images, expected, args)
    finally:
        for replica in replicas:
            replica.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
