"""Start `mnist-serve` as a child process and wait until it is SERVING.

Shared by the tests, `make loadtest` and the benchmark, so that all of them run
the real server the same way.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(target: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until the server says SERVING; fail early if the process died."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"no SERVING answer from {target} within {timeout:.0f} s")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(repository: Path | str, *extra_args: str, log_path: Path | None = None,
                 ready_timeout: float = 60.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Run `mnist-serve` on free loopback ports; return once it reports SERVING."""
    port, metrics_port = free_port(), free_port()
    args = [sys.executable, "-m", "serving.cli", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), *extra_args]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, metrics_port, log_path, args)
    try:
        wait_until_serving(server.target, ready_timeout, proc)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server
