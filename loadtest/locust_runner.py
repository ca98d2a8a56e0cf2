"""What `loadtest.run` and `loadtest.batching_study` share: run Locust headless, read its CSV.

The run's steps: check the server answers, clear a previous run's files, build Locust's command
line, run it to its end (loadtest/locust_process.py) and read its statistics back
(loadtest/locust_report.py). Request names and option parsing are loadtest/locust_args.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.locust_args import LoadTestError, parse_seconds
from loadtest.locust_process import run_to_end
from loadtest.locust_report import Stats, locust_problem, read_failures_csv, read_stats_csv
from loadtest.options import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
_CSV_SUFFIXES = ("_stats.csv", "_failures.csv", "_exceptions.csv", "_stats_history.csv")


@dataclass
class LocustRun:
    """A finished Locust run: its exit status, statistics and where its files are."""

    returncode: int
    stats: dict[str, Stats]
    csv_prefix: Path
    html_path: Path | None
    log_path: Path | None
    failures: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def total(self) -> Stats:
        return self.stats["Aggregated"]


def check_reachable(target: str, timeout: float = 5.0) -> None:
    """Raise LoadTestError unless an mnist-serve at `target` answers SERVING within `timeout` s.

    Done before Locust starts, so a wrong address fails in seconds with one line rather than
    as a minute of failed calls.
    """
    from serving.client import ClassifierClient  # grpc: imported only by the callers that need it

    with ClassifierClient(target, timeout=timeout) as client:
        try:
            client.wait_until_ready(timeout)
        except TimeoutError as error:
            raise LoadTestError(str(error)) from None


def locust_command(
    target: str,
    *,
    scenario: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    csv_prefix: Path,
    html_path: Path | None = None,
    processes: int | None = None,
    images_per_call: int = DEFAULTS.images_per_call,
    mix_weights: str | None = None,
    stop_timeout: float = DEFAULTS.stop_timeout,
    reset_stats: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        target,
        "-u",
        str(users),
        "-r",
        f"{spawn_rate:g}",
        "-t",
        str(run_time),
        "--stop-timeout",
        f"{stop_timeout:g}",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--scenario",
        scenario,
        "--images-per-call",
        str(images_per_call),
    ]
    if mix_weights:
        command += ["--mix-weights", mix_weights]
    if html_path is not None:
        command += ["--html", str(html_path)]
    if processes:
        command += ["--processes", str(processes)]
    if reset_stats:
        command.append("--reset-stats")
    return command + list(extra or [])


def run_locust(
    target: str,
    *,
    scenario: str = DEFAULTS.scenario,
    users: int = DEFAULTS.users,
    spawn_rate: float = DEFAULTS.spawn_rate,
    run_time: str = DEFAULTS.run_time,
    csv_prefix: Path,
    html_path: Path | None = None,
    log_path: Path | None = None,
    processes: int | None = None,
    images_per_call: int = DEFAULTS.images_per_call,
    mix_weights: str | None = None,
    stop_timeout: float = DEFAULTS.stop_timeout,
    reset_stats: bool = False,
    extra: list[str] | None = None,
    stream: bool = False,
    on_spawned: Callable[[], None] | None = None,
) -> LocustRun:
    """Run Locust headless against `target`; return its statistics once it has finished.

    Locust's output goes to `log_path` (or to this terminal when `stream`). The run is killed
    if it outlives its run time by a wide margin, so nothing here can hang. `on_spawned` is
    called once all users run (Locust logs so), e.g. to read the server's metrics at the start
    of the measured window.
    """
    csv_prefix = _fresh_csv_prefix(Path(csv_prefix))
    command = locust_command(
        target,
        scenario=scenario,
        users=users,
        spawn_rate=spawn_rate,
        run_time=run_time,
        csv_prefix=csv_prefix,
        html_path=html_path,
        processes=processes,
        images_per_call=images_per_call,
        mix_weights=mix_weights,
        stop_timeout=stop_timeout,
        reset_stats=reset_stats,
        extra=extra,
    )
    deadline = parse_seconds(run_time) + stop_timeout + 90.0  # start-up, load pool, report writing
    log = None if stream or log_path is None else open(log_path, "wb")
    try:
        returncode = run_to_end(command, ROOT, log, log_path, deadline, on_spawned)
    finally:
        if log:
            log.close()
    return _finished_run(returncode, csv_prefix, html_path, log_path if log else None)


def _fresh_csv_prefix(csv_prefix: Path) -> Path:
    """Make the prefix's folder and delete a previous run's files: never report their numbers."""
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in _CSV_SUFFIXES:
        Path(f"{csv_prefix}{suffix}").unlink(missing_ok=True)
    return csv_prefix


def _finished_run(
    returncode: int, csv_prefix: Path, html_path: Path | None, log_path: Path | None
) -> LocustRun:
    """The run's statistics, or LoadTestError (with the log's reason) when Locust wrote none."""
    stats_path = Path(f"{csv_prefix}_stats.csv")
    if not stats_path.exists():
        tail = locust_problem(log_path) if log_path else ""
        raise LoadTestError(
            f"Locust exited with status {returncode} and wrote no statistics"
            + (f": {tail}" if tail else "")
            + (f" (log: {log_path})" if log_path else "")
        )
    return LocustRun(
        returncode,
        read_stats_csv(stats_path),
        csv_prefix,
        html_path,
        log_path,
        read_failures_csv(Path(f"{csv_prefix}_failures.csv")),
    )
