"""One `--workers` process: a complete `Server` on the shared port, from spawn to its exit status.

The parent (serving.supervisor) spawns it with its settings and its slot's index. It serves as a
lone server does (serving.server.serve), with two differences: it listens for SIGTERM/SIGINT
before its model loads, and it drains when the parent dies. Heavy imports wait until the signal
handlers are in, so that a SIGTERM during start-up is remembered rather than fatal.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading

from serving import event_loop
from serving.config import ServeConfig

# worker_main's status when its server could not start (after one line saying why); not 1, which
# is also what an uncaught exception gives a worker that had served (that one is replaced).
START_UP_FAILED = 3


def worker_main(config: ServeConfig, index: int, board=None) -> None:
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
        code = event_loop.run(_serve(config, early_stop))
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
    # It died before prctl: no signal will come.
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)


async def _serve(config: ServeConfig, early_stop: threading.Event) -> int:
    """serving.server.serve, with the signal handlers installed before the model loads."""
    from serving.server import serve, stop_on_signals

    stop = stop_on_signals()
    if early_stop.is_set():
        stop.set()
    return await serve(config, stop)
