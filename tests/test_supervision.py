"""Worker supervision: a worker that dies is replaced, the others keep serving, a crash loop stops.

Real `mnist-serve --workers 2` processes; a worker is killed with SIGKILL (what the OOM killer
sends). Before supervision, the parent then stopped the other worker and exited 1, so every
call in flight on either worker was lost and the health check failed until a restart.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import ClassifierClient
from serving.process import start_server
from tests.support.draining import model_infer, own_channel

CALLERS = 8


def worker_pids(parent: int) -> set[int]:
    """The parent's worker processes (not multiprocessing's resource tracker)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except FileNotFoundError:
        return set()
    found = set()
    for child in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except FileNotFoundError:
            pass
    return found


def images_per_worker(server) -> dict[int, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        int(pid): float(value)
        for pid, value in re.findall(
            r'^mnist_worker_images\{pid="(\d+)"\} (\S+)$', text, re.MULTILINE
        )
    }


def ok_calls(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        float(value)
        for labels, value in re.findall(
            r"^mnist_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE
        )
        if 'code="OK"' in labels and "ModelInfer" in labels
    )


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def serving_lines(server) -> int:
    return len(re.findall(r"\[worker \d\]: serving ", server.log()))


class Callers:
    """CALLERS threads with a client each (a connection each, spread over the workers), and a
    health prober that opens a new connection for every probe."""

    def __init__(self, server, digits) -> None:
        self.outcomes: collections.Counter = collections.Counter()
        self.health: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._call, args=(server.target, digits), daemon=True)
            for _ in range(CALLERS)
        ]
        self._threads.append(
            threading.Thread(target=self._probe, args=(server.target,), daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def _call(self, target: str, digits) -> None:
        with own_channel(target) as channel:
            while not self._stop.is_set():
                try:
                    model_infer(channel, digits)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with self._lock:
                    self.outcomes[code] += 1

    def _probe(self, target: str) -> None:
        while not self._stop.is_set():
            with grpc.insecure_channel(target) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as error:
                    status = error.code().name
            with self._lock:
                self.health[status] += 1
            time.sleep(0.05)

    def count(self) -> int:
        with self._lock:
            return self.outcomes["OK"]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def check_only_the_dead_workers_calls_failed(callers: Callers) -> None:
    # Only calls in flight on the dead worker may fail (one per caller at most), and only as
    # UNAVAILABLE (its connection closed), which the client retries on the other worker.
    assert set(callers.outcomes) <= {"OK", "UNAVAILABLE"}, dict(callers.outcomes)
    assert callers.outcomes["UNAVAILABLE"] <= CALLERS, dict(callers.outcomes)
    # Health answered SERVING throughout: no probe saw NOT_SERVING.
    assert callers.health["SERVING"] > 0 and "NOT_SERVING" not in callers.health, dict(
        callers.health
    )


@pytest.mark.timeout(600)
def test_a_killed_worker_is_replaced_while_the_other_serves(
    trained_repository, mnist_test_set, tmp_path
):
    digits = mnist_test_set[0][:8]
    server = start_server(
        trained_repository,
        "--workers",
        "2",
        "--grace-period",
        "10",
        log_path=tmp_path / "server.log",
    )
    try:
        wait_until(lambda: serving_lines(server) == 2, 120, "both workers")
        callers = Callers(server, digits)
        try:
            wait_until(lambda: callers.count() >= 50, 120, "50 calls")
            wait_until(
                lambda: len([v for v in images_per_worker(server).values() if v > 0]) == 2,
                60,
                "both workers to answer calls",
            )
            originals = worker_pids(server.proc.pid)
            victim = min(originals)
            ok_before = ok_calls(server)
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: "died (killed by SIGKILL); starting a fresh one" in server.log(),
                60,
                "the death",
            )
            killed_at = callers.count()
            wait_until(lambda: callers.count() >= killed_at + 50, 120, "50 calls after the kill")
            wait_until(lambda: serving_lines(server) == 3, 120, "the fresh worker to serve")
        finally:
            callers.stop()
        assert server.proc.poll() is None, server.log()[-3000:]
        check_only_the_dead_workers_calls_failed(callers)
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2 and victim not in workers, (workers, victim)
        (fresh,) = workers - originals
        # New connections reach the fresh worker too (the kernel spreads them over both listeners).
        for _ in range(24):
            with ClassifierClient(server.target, timeout=60) as client:
                client.infer_kserve(digits)
        per_worker = images_per_worker(server)
        assert victim not in per_worker, f"the dead worker's gauge is still summed: {per_worker}"
        assert set(per_worker) == workers and per_worker[fresh] > 0, (per_worker, workers)
        assert ok_calls(server) >= ok_before + 24, (
            "the dead worker's counts must stay in the totals"
        )
        assert server.stop(signal.SIGTERM) == 0, server.log()[-3000:]
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.timeout(600)
def test_a_crash_loop_stops_the_server_with_one_line_and_status_1(trained_repository, tmp_path):
    server = start_server(trained_repository, "--workers", "2", log_path=tmp_path / "server.log")
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while server.proc.poll() is None:
            assert time.monotonic() < deadline, server.log()[-3000:]
            for pid in worker_pids(server.proc.pid) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.2)
        code = server.proc.wait(60)
    finally:
        server.stop(signal.SIGKILL)
    log = server.log()
    assert code == 1, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("mnist-serve: error:")]
    assert len(lines) == 1 and "workers died 5 times in 60 s" in lines[0], lines
    assert 5 <= len(killed) <= 7, (
        killed
    )  # the fifth death stopped it (a worker or two may be killed late)
    assert "Traceback" not in log, log[-3000:]


def wait_until_gone(pid: int, seconds: float = 60) -> bool:
    """Whether `pid` exits (or is a zombie awaiting its reaper) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(300)
def test_workers_drain_and_exit_when_the_parent_is_killed(trained_repository, tmp_path):
    """No orphan keeps the port: a SIGKILLed parent (the OOM killer's choice, too) takes its workers."""
    server = start_server(trained_repository, "--workers", "2", log_path=tmp_path / "server.log")
    try:
        wait_until(lambda: serving_lines(server) == 2, 120, "both workers")
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        server.proc.kill()
        server.proc.wait(30)
        for pid in workers:
            assert wait_until_gone(pid), f"worker {pid} outlived its parent"
        assert server.log().count("draining: NOT_SERVING") == 2, server.log()[-3000:]
    finally:
        server.stop(signal.SIGKILL)
