"""`--workers N`: N server processes sharing one gRPC port, so that every core does Python work.

One process has one event loop and one GIL; decoding, batching and answering calls all run on
it, so a single process cannot use a second core for the per-call work. Here the parent process
loads nothing: it checks the ports, starts N workers (spawned, so that none inherits gRPC state),
and each worker is a complete `Server` (its own loop, batcher and onnxruntime session) bound to
the same port with SO_REUSEPORT, as gRPC's Python multiprocessing example does. The kernel hands
each new connection to one worker; every call on that connection goes to that worker, so its
health answers and its calls always come from the same process.

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
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from serving import event_loop
from serving.config import ServeConfig

log = logging.getLogger("mnist-serve")

PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(config: ServeConfig, cores: int | None = None) -> ServeConfig:
    """Fill in the automatic settings (0): workers and each worker's onnxruntime threads.

    Workers: one per core on the CPU; one on a GPU, where several processes would each hold a CUDA
    context and contend for one device. Threads for large batches: every core; a worker uses them
    only while the other workers idle (serving.inference.activity), else one thread.
    """
    cores = cores or usable_cores()
    explicit = config.model_control_mode == "explicit"
    if explicit and config.workers > 1:
        # A load or unload call reaches the one worker its connection landed on; the others would differ.
        raise ValueError(
            "--model-control-mode explicit needs --workers 1 (a load/unload call reaches one worker "
            "only); use --model-control-mode poll with several workers"
        )
    workers = config.workers or (1 if explicit or _gpu_likely(config.device) else cores)
    threads = config.intra_op_threads or cores
    return dataclasses.replace(config, workers=workers, intra_op_threads=threads)


def _gpu_likely(device: str) -> bool:
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    from serving.inference.runtime import cuda_problem  # `auto`: the GPU, when CUDA can work here

    return cuda_problem() is None


def worker_config(config: ServeConfig, index: int) -> ServeConfig:
    """A worker's own settings: no metrics port (the parent serves it); HTTP, like gRPC, on every
    worker (SO_REUSEPORT). `index` stays for settings that differ per worker."""
    return dataclasses.replace(config, metrics_port=0)


def _worker_main(config: ServeConfig, index: int, board=None) -> None:
    """A worker process: one complete server on the shared port, until SIGTERM/SIGINT."""
    if board is not None:  # who else runs inference now: large batches take the cores others leave
        from serving.inference import activity

        activity.join(board, index)
    # A SIGTERM can come while this worker still loads (the others already serve): remember it and
    # drain once started, rather than dying with a signal status.
    early_stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: early_stop.set())
    _drain_when_the_parent_dies()
    from serving import log_setup, tracing

    log_setup.configure(config.log_level, config.log_format, worker=index)
    from core.repository import RepositoryError
    from serving.inference.runtime import DeviceUnavailable

    try:
        tracing.setup(tracing.TraceSettings.of(config), worker=index)  # its own exporter thread
        code = event_loop.run(_serve_worker(config, early_stop))
    except (RepositoryError, DeviceUnavailable, OSError) as err:
        print(f"mnist-serve: error: worker {index}: {err}", file=sys.stderr)
        code = START_UP_FAILED
    finally:
        tracing.shutdown()
    sys.exit(code)


def _drain_when_the_parent_dies() -> None:
    """Linux: SIGTERM this worker when the parent dies (SIGKILL, the OOM killer), so that it drains
    and exits rather than go on holding the port as an orphan nobody supervises or stops."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if (
        parent is not None and os.getppid() != parent.pid
    ):  # it died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


async def _serve_worker(config: ServeConfig, early_stop: threading.Event) -> int:
    """serving.server.serve, with the signal handlers installed before the model loads."""
    import asyncio

    from serving.server import Server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early_stop.is_set():
        stop.set()
    server = Server(config)
    await server.start()
    await stop.wait()
    await server.drain()
    await server.stop()
    return 0


def run_workers(config: ServeConfig) -> int:
    """The parent: check the ports, start the workers, serve the summed metrics, forward signals."""
    from core.repository import RepositoryError, load_version, no_versions_message
    from serving.inference.registry import list_models
    from serving.server import PortInUse, ensure_port_free

    # A missing model is one error line from here, not one per worker.
    names = config.model_names or list_models(config.model_repository)
    if not names and config.model_control_mode != "explicit":
        raise RepositoryError(no_versions_message(config.model_repository))
    for name in names:
        load_version(config.model_repository, name, config.model_version).verify_checksum()
    # Checked here, once: the workers bind with SO_REUSEPORT and would share a port another server holds.
    ensure_port_free(config.host, config.port, "--port")
    if config.http_port:
        ensure_port_free(config.host, config.http_port, "--http-port")

    metrics_dir = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    # Set before any worker imports prometheus_client: the library picks its storage at import time.
    os.environ[PROMETHEUS_DIR_VARIABLE] = metrics_dir
    httpd = None
    workers: list[multiprocessing.Process] = []
    stopping = False

    def stop_workers() -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)  # each drains like a lone server

    def forward(signum, _frame) -> None:
        if not stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(workers))
        stop_workers()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        if config.metrics_port:
            try:
                httpd = _serve_summed_metrics(config.metrics_port, config.host)
            except OSError as err:
                raise PortInUse(
                    f"cannot serve metrics on {config.host}:{config.metrics_port} ({err.strerror}); "
                    f"choose another --metrics-port, or 0 to turn metrics off"
                ) from err
        context = multiprocessing.get_context(
            "spawn"
        )  # no gRPC or onnxruntime state crosses a fork
        from serving.inference.activity import new_board

        board = new_board(context, config.workers)
        settings: dict[int, tuple] = {}  # each slot's _worker_main arguments, for its replacements
        for index in range(config.workers):
            if stopping:
                break
            settings[index] = (worker_config(config, index), index, board)
            worker = context.Process(
                target=_worker_main, args=settings[index], name=f"mnist-serve-worker-{index}"
            )
            worker.start()
            workers.append(worker)
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

        def replace(index: int, dead: multiprocessing.Process) -> multiprocessing.Process:
            """A fresh worker in the dead one's slot, with the same settings."""
            fresh = context.Process(target=_worker_main, args=settings[index], name=dead.name)
            fresh.start()
            workers[index] = fresh  # stop_workers reaches it too
            return fresh

        return _supervise(workers, lambda: stopping, stop_workers, replace)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(
    workers: list[multiprocessing.Process],
    stopping: Callable[[], bool],
    stop_all: Callable[[], None],
    replace: Callable[[int, multiprocessing.Process], multiprocessing.Process],
) -> int:
    """Wait for the workers, replacing any that dies while the server serves; the exit status.

    0 when every worker drained and exited 0 after SIGTERM/SIGINT. 1 when a worker's start-up
    failed (it exits 1 after one line saying why: a model onnxruntime refuses, a device), since a
    fresh one would fail the same way, or on a crash loop (CrashLoop); the others are stopped first.
    """
    from prometheus_client import multiprocess

    failed = False
    loop = CrashLoop()
    running = dict(
        enumerate(workers)
    )  # slot -> its process (a replacement takes the dead one's slot)
    while running:
        wait([worker.sentinel for worker in running.values()], timeout=0.5)
        for index, worker in list(running.items()):
            if worker.exitcode is None:
                continue
            del running[index]
            # Its live gauges (queue depth, model info, images per worker) leave the sums; its
            # counters and histograms stay: what it answered was answered.
            multiprocess.mark_process_dead(worker.pid)
            if stopping():
                # Killed by the forwarded SIGTERM before it could install its handler: it had served nothing.
                failed |= worker.exitcode not in (0, -signal.SIGTERM)
                continue
            if worker.exitcode == START_UP_FAILED:
                log.error(
                    "worker %s exited with status %s; stopping the others",
                    worker.name,
                    worker.exitcode,
                )
                failed = True
                stop_all()
                continue
            why = _exit_reason(worker.exitcode)
            if loop.died(time.monotonic()):
                print(
                    f"mnist-serve: error: {loop.describe()} (the last, {worker.name}, {why}); stopping: "
                    "a worker that keeps dying is not served around, see the lines above for why",
                    file=sys.stderr,
                    flush=True,
                )
                failed = True
                stop_all()
                continue
            log.warning(
                "worker %s (pid %s) died (%s); starting a fresh one, the others go on serving",
                worker.name,
                worker.pid,
                why,
            )
            running[index] = replace(index, worker)
    return 1 if failed else 0


# _worker_main's status when its server could not start (after one line saying why); not 1, which is
# also what an uncaught exception gives a worker that had served (that one is replaced).
START_UP_FAILED = 3

# A crash loop: this many deaths within CRASH_LOOP_SECONDS stop the server (exit 1), so that the
# orchestrator sees a broken server rather than workers that die as fast as they are replaced.
# 5 in 60 s: a worker takes 1-3 s to load and warm up, so one that dies at once dies 5 times in
# about 15 s; OOM kills minutes apart (a memory limit set too tight for a burst) are replaced.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 60.0


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


def _exit_reason(exitcode: int) -> str:
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
