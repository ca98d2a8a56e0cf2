"""Start `mnist-serve` as a child process and wait until it is SERVING.

Shared by the tests, `make loadtest` and the benchmark, so that all of them run
the real server the same way.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from serving.client import ClassifierClient, ClientTls

# Ports handed out by free_port(), each held by an open, locked file for this process's lifetime.
_reserved: dict[int, IO[str]] = {}


def _port_range() -> tuple[int, int]:
    """Ports the kernel never picks on its own: below its ephemeral range (or above it)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 20000 >= 2000:
        return 20000, low
    return high + 1, 65536


def free_port() -> int:
    """A loopback port that nobody else will take before our server binds it.

    Binding port 0, closing, and passing the number on is a race: the kernel may hand the same
    port to any other socket in between. So ports come from outside the kernel's ephemeral range
    (no connect() or bind(0) ever gets one), and a lock file per port, held until this process
    exits, keeps concurrent test runs and servers started by this process from picking the same one.
    """
    lock_dir = Path(tempfile.gettempdir()) / "mnist-serving-ports"
    lock_dir.mkdir(exist_ok=True)
    low, high = _port_range()
    pick = random.SystemRandom()  # not `random`: pytest-randomly seeds it alike in every process
    for _ in range(500):
        port = pick.randrange(low, high)
        if port in _reserved:
            continue
        handle = open(lock_dir / f"{port}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as probe:  # and no process outside this scheme listens there
                probe.bind(("127.0.0.1", port))
        except OSError:
            handle.close()
            continue
        _reserved[port] = handle
        return port
    raise RuntimeError(f"no free port in {low}-{high - 1} after 500 tries")


def wait_until_serving(
    target: str, timeout: float, proc: subprocess.Popen | None = None, tls: ClientTls | None = None
) -> None:
    """The client's health polling, in short slices so that a server that died fails at once."""
    deadline = time.monotonic() + timeout
    with ClassifierClient(target, tls=tls) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {proc.returncode} before it was ready"
                )
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
    temporary_log: bool = (
        False  # start_server made log_path itself: removed once the server stopped
    )

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
        return (
            self.log_path.read_text(errors="replace")
            if self.log_path and self.log_path.exists()
            else ""
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.temporary_log and self.log_path:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_command(
    repository: Path | str | None,
    *extra_args: str,
    port: int,
    metrics_port: int = 0,
    http_port: int = 0,
) -> list[str]:
    """The argv of `mnist-serve` on loopback (None: the caller names --model-repository in extra_args)."""
    named = ["--model-repository", str(repository)] if repository is not None else []
    return [
        sys.executable,
        "-m",
        "serving.cli",
        *named,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        str(http_port),
        *extra_args,
    ]


def start_server(
    repository: Path | str,
    *extra_args: str,
    log_path: Path | None = None,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    tls: ClientTls | None = None,
) -> ServerProcess:
    """Run `mnist-serve` on free loopback ports; return once it reports SERVING (over TLS with `tls`)."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    args = serve_command(
        repository, *extra_args, port=port, metrics_port=metrics_port, http_port=http_port
    )
    # Without a log path the output still goes to a file, so that a server that fails to start says why.
    temporary_log = log_path is None
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="mnist-serve-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = ServerProcess(proc, port, metrics_port, log_path, args, http_port, temporary_log)
    try:
        wait_until_serving(server.target, ready_timeout, proc, tls)
    except RuntimeError as error:
        last = server.log().strip().splitlines()[-3:]
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"{error}; its last lines: {' | '.join(last) or '(none)'}") from None
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server
