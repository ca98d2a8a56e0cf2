"""`--workers N`: N server processes sharing one gRPC port, so that every core does Python work.

One process has one event loop and one GIL; decoding, batching and answering calls all run on
it, so a single process cannot use a second core for the per-call work. Here the parent process
loads nothing: it checks the ports, starts N workers (spawned, so that none inherits gRPC state),
and each worker is a complete `Server` (serving.worker: its own loop, batcher and onnxruntime
session) bound to the same port with SO_REUSEPORT, as gRPC's Python multiprocessing example does.
The kernel hands each new connection to one worker; every call on that connection goes to that
worker, so its health answers and its calls always come from the same process.

- Metrics: Prometheus' multiprocess mode. Each worker writes its counters and histograms to files
  in a private folder; the parent serves the one /metrics endpoint, summed over the workers
  (per-worker series carry a `pid` label where that is the point, e.g. mnist_worker_images).
- Draining: the parent forwards SIGTERM/SIGINT to every worker; each drains as a lone server does
  (NOT_SERVING, refuse new calls, finish accepted ones) and exits 0; the parent exits 0 when all did.
- Supervision: a worker that dies while the server serves (SIGKILL, a crash, the OOM killer) is
  replaced by a fresh one in its slot; the others go on serving, so the only calls lost are
  those in flight on the dead one (retrying clients reconnect to another worker). Its live
  gauges are removed from the sums (mark_process_dead). A crash loop (CRASH_LOOP_DEATHS deaths in
  CRASH_LOOP_SECONDS), or a worker whose start-up fails, stops the server with one line and exit 1.
- HTTP (REST and the page) is served by every worker on one shared port (SO_REUSEPORT), as gRPC is.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait

from serving.config import ServeConfig
from serving.worker import START_UP_FAILED, worker_main

log = logging.getLogger("mnist-serve")

PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# A crash loop: this many deaths within CRASH_LOOP_SECONDS stop the server (exit 1), so that the
# orchestrator sees a broken server rather than workers that die as fast as they are replaced.
# 5 in 60 s: a worker takes 1-3 s to load and warm up, so one that dies at once dies 5 times in
# about 15 s; OOM kills minutes apart (a memory limit set too tight for a burst) are replaced.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 60.0


def run_workers(config: ServeConfig) -> int:
    """The parent: check the ports, start the workers, serve the summed metrics, forward signals."""
    _check_before_spawning(config)
    metrics_dir = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    # Set before any worker imports prometheus_client: the library picks its storage at import time.
    os.environ[PROMETHEUS_DIR_VARIABLE] = metrics_dir
    pool = WorkerPool(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pool.forward)
    httpd = None
    try:
        if config.metrics_port:
            from serving.ports import serve_metrics_or_refuse

            httpd = serve_metrics_or_refuse(_serve_summed_metrics, config)
        pool.start_all()
        log.info(
            "%d workers on %s:%d (SO_REUSEPORT), %d onnxruntime thread(s) for a large batch while "
            "the other workers idle, else 1; "
            "metrics on :%s",
            config.workers,
            config.host,
            config.port,
            config.intra_op_threads,
            config.metrics_port or "off",
        )
        return supervise(pool)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_before_spawning(config: ServeConfig) -> None:
    """A missing model or a taken port is one error line from here, not one per worker."""
    from core.repository import RepositoryError, load_version, no_versions_message
    from serving.inference.repository_scan import list_models
    from serving.ports import ensure_ports_free

    names = config.model_names or list_models(config.model_repository)
    if not names and config.model_control_mode != "explicit":
        raise RepositoryError(no_versions_message(config.model_repository))
    for name in names:
        load_version(config.model_repository, name, config.model_version).verify_checksum()
    # Checked here, once: the workers bind with SO_REUSEPORT and would share a port another
    # server holds.
    ensure_ports_free(config)


def worker_config(config: ServeConfig, index: int) -> ServeConfig:
    """A worker's own settings: no metrics port (the parent serves it); HTTP, like gRPC, on every
    worker (SO_REUSEPORT). `index` stays for settings that differ per worker."""
    return dataclasses.replace(config, metrics_port=0)


class WorkerPool:
    """The worker processes, one per slot, and whether the server is stopping."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.processes: list[multiprocessing.Process] = []  # by slot
        self.stopping = False
        # No gRPC or onnxruntime state crosses a fork.
        self._context = multiprocessing.get_context("spawn")
        self._settings: dict[int, tuple] = {}  # each slot's worker_main arguments, for replacements

    def start_all(self) -> None:
        from serving.inference.activity import new_board

        board = new_board(self._context, self.config.workers)
        for index in range(self.config.workers):
            if self.stopping:
                break
            self._settings[index] = (worker_config(self.config, index), index, board)
            self.processes.append(self._spawn(index, f"mnist-serve-worker-{index}"))

    def replace(self, index: int, dead: multiprocessing.Process) -> multiprocessing.Process:
        """A fresh worker in the dead one's slot, with the same settings."""
        fresh = self._spawn(index, dead.name)
        self.processes[index] = fresh  # stop_all reaches it too
        return fresh

    def stop_all(self) -> None:
        self.stopping = True
        for worker in self.processes:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)  # each drains like a lone server

    def forward(self, signum, _frame) -> None:
        """The parent's SIGTERM/SIGINT handler: every worker drains."""
        if not self.stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.processes))
        self.stop_all()

    def _spawn(self, index: int, name: str) -> multiprocessing.Process:
        worker = self._context.Process(target=worker_main, args=self._settings[index], name=name)
        worker.start()
        return worker


def supervise(pool: WorkerPool) -> int:
    """Wait for the workers, replacing any that dies while the server serves; the exit status.

    0 when every worker drained and exited 0 after SIGTERM/SIGINT. 1 when a worker's start-up
    failed (it exits 1 after one line saying why: a model onnxruntime refuses, a device), since a
    fresh one would fail the same way, or on a crash loop (CrashLoop); the others are stopped first.
    """
    from prometheus_client import multiprocess

    failed = False
    crash_loop = CrashLoop()
    # slot -> its process (a replacement takes the dead one's slot)
    running = dict(enumerate(pool.processes))
    while running:
        wait([worker.sentinel for worker in running.values()], timeout=0.5)
        for index, worker in list(running.items()):
            if worker.exitcode is None:
                continue
            del running[index]
            # Its live gauges (queue depth, model info, images per worker) leave the sums; its
            # counters and histograms stay: what it answered was answered.
            multiprocess.mark_process_dead(worker.pid)
            if pool.stopping:
                # Killed by the forwarded SIGTERM before it could install its handler: it had
                # served nothing.
                failed |= worker.exitcode not in (0, -signal.SIGTERM)
            elif _stops_the_server(worker, crash_loop):
                failed = True
                pool.stop_all()
            else:
                log.warning(
                    "worker %s (pid %s) died (%s); starting a fresh one, the others go on serving",
                    worker.name,
                    worker.pid,
                    exit_reason(worker.exitcode),
                )
                running[index] = pool.replace(index, worker)
    return 1 if failed else 0


def _stops_the_server(worker: multiprocessing.Process, crash_loop: CrashLoop) -> bool:
    """Whether this death stops the server (with one line saying why): it could not start, or
    it makes a crash loop. Any other death is replaced."""
    if worker.exitcode == START_UP_FAILED:
        log.error(
            "worker %s exited with status %s; stopping the others", worker.name, worker.exitcode
        )
        return True
    if crash_loop.died(time.monotonic()):
        print(
            f"mnist-serve: error: {crash_loop.describe()} (the last, {worker.name}, "
            f"{exit_reason(worker.exitcode)}); stopping: "
            "a worker that keeps dying is not served around, see the lines above for why",
            file=sys.stderr,
            flush=True,
        )
        return True
    return False


@dataclasses.dataclass
class CrashLoop:
    """The recent worker deaths, and whether they make a crash loop."""

    deaths: int = CRASH_LOOP_DEATHS
    seconds: float = CRASH_LOOP_SECONDS
    times: collections.deque = dataclasses.field(default_factory=collections.deque)

    def died(self, now: float) -> bool:
        """Count a death at `now`; True when it makes `deaths` within `seconds`."""
        self.times.append(now)
        while self.times and self.times[0] <= now - self.seconds:
            self.times.popleft()
        return len(self.times) >= self.deaths

    def describe(self) -> str:
        return f"workers died {len(self.times)} times in {self.seconds:.0f} s"


def exit_reason(exitcode: int) -> str:
    """A dead worker's exit code in words: `killed by SIGKILL`, `exit status 1`."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _serve_summed_metrics(port: int, host: str):
    """/metrics over all workers' files (Prometheus multiprocess mode), from a background thread."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return httpd
