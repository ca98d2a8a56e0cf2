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

from serving.client import ClassifierClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(target: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """The client's health polling, in short slices so that a server that died fails at once."""
    deadline = time.monotonic() + timeout
    with ClassifierClient(target) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
            remaining = deadline - time.monotonic()
            try:
                client.wait_until_ready(min(0.5, max(remaining, 0.01)))
                return
            except TimeoutError:
                if remaining <= 0.5:
                    raise


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)
    http_port: int = 0  # KServe v2 REST and the page (0: off)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

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
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    args = [sys.executable, "-m", "serving.cli", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port), *extra_args]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, metrics_port, log_path, args, http_port)
    try:
        wait_until_serving(server.target, ready_timeout, proc)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server
