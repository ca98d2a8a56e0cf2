"""The Locust process: started in its own session (so it and its --processes children go down
together), watched until every user runs, and stopped when it outlives its deadline or the
caller is interrupted.

Locust runs as a child process because it monkey-patches the whole interpreter with gevent,
which the server process and matplotlib should not see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from loadtest.locust_args import LoadTestError

_SPAWNED_MARK = "All users spawned"


def run_to_end(
    command: list[str],
    cwd: Path,
    log: IO[bytes] | None,
    log_path: Path | None,
    deadline: float,
    on_spawned: Callable[[], None] | None = None,
) -> int:
    """Run Locust's `command` to its end, its output in `log` (else this terminal); its status.

    Killed, with LoadTestError, if it runs past `deadline` seconds; killed and re-raised on
    Ctrl-C. `on_spawned` is called once Locust logs that every user runs (needs a log)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
        start_new_session=True,
    )
    try:
        if on_spawned is not None and log is not None:
            _wait_for_spawn(proc, Path(log_path), started + deadline, on_spawned)
        return proc.wait(max(0.1, started + deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise LoadTestError(
            f"Locust did not finish within {deadline:.0f} s and was stopped"
            + (f"; see {log_path}" if log else "")
        ) from None
    except BaseException:  # Ctrl-C: take Locust (and its --processes children) down too
        _kill_group(proc)
        raise


def _wait_for_spawn(
    proc: subprocess.Popen, log_path: Path, end: float, callback: Callable[[], None]
) -> None:
    """Poll Locust's log until it says every user runs (or Locust ends); then call `callback`."""
    while proc.poll() is None and time.monotonic() < end:
        if log_path.exists() and _SPAWNED_MARK in log_path.read_text(errors="replace"):
            callback()
            return
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
