"""The small tools docker/local_swarm.py's steps share: its progress lines, commands that raise
ClusterError with what went wrong, waiting for a condition, and stopping a process by pidfile."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from swarm_cluster import ClusterError, Node


def say(message: str) -> None:
    print(f"[local-swarm] {message}", flush=True)


def run(
    *argv: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"`{' '.join(argv)}` exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-1500:]}"
        )
    return result


def docker(node: Node | None, *args: str, **kwargs) -> subprocess.CompletedProcess:
    host = ["-H", node.host] if node else []
    return run("docker", *host, *args, **kwargs)


def wait_for(what: str, ready, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def pid_of(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_pid(pid: int, grace: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
