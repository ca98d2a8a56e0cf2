"""What `loadtest.run` and `loadtest.batching_study` share: run Locust headless, read its CSV.

Locust runs as a child process (it monkey-patches the whole interpreter with gevent,
which the server process and matplotlib should not see), and its numbers are read back
from the `<prefix>_stats.csv` file it writes, so what we print is what its HTML report shows.

Only the standard library is imported at module level: the locustfile imports this module too.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.options import DEFAULTS, SCENARIOS  # noqa: F401  (SCENARIOS: re-exported for the scripts)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


class LoadTestError(Exception):
    """A load test that could not run or finished badly; the message is one line for the user."""


# --- what the locustfile calls each request (and what the CSV rows are named) ---------------


def single_request_name() -> str:
    return "Classify x1"


def batch_request_name(images_per_call: int) -> str:
    return f"Classify x{images_per_call}"


def kserve_request_name() -> str:
    return "KServe ModelInfer x1"


def rest_request_name() -> str:
    return "REST infer x1"


def request_names(scenario: str, images_per_call: int) -> list[str]:
    """The request names a scenario produces (the rows of the stats CSV, besides Aggregated)."""
    names = {
        "single": [single_request_name()],
        "batch": [batch_request_name(images_per_call)],
        "kserve": [kserve_request_name()],
        "rest": [rest_request_name()],
    }
    if scenario == "mix":
        return [name for key in ("single", "batch", "kserve") for name in names[key]]
    return names[scenario]


def parse_mix_weights(text: str) -> tuple[int, ...]:
    """'6,3,1' -> (6, 3, 1): the relative weights of single, batch and kserve calls in `mix`;
    a fourth, '6,3,1,2', mixes in REST calls (KServe v2 over HTTP)."""
    try:
        weights = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        weights = ()
    if len(weights) not in (3, 4) or any(w < 0 for w in weights) or sum(weights) == 0:
        raise LoadTestError(
            f"--mix-weights {text!r}: give three non-negative integers for single,batch,kserve "
            "(or four, with rest) with at least one above zero, e.g. 6,3,1 or 6,3,1,2"
        )
    return weights  # type: ignore[return-value]


def normalize_target(host: str) -> str:
    """Locust's --host as a gRPC target: 'host:port', with an optional 'grpc://' stripped, or a target
    that names several replicas ('dns:///host:port', 'ipv4:a:port,b:port'), kept as it is: the
    users' client balances per call over all of them."""
    target = (host or "").strip().rstrip("/")
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        return target
    if target.startswith("grpc://"):
        target = target[len("grpc://") :]
    if not target or "://" in target or "/" in target or ":" not in target:
        raise LoadTestError(
            f"--host {host!r}: give the server as host:port (e.g. 127.0.0.1:8500), "
            "optionally with grpc://, or replicas as dns:///host:port or ipv4:a:port,b:port; "
            "not an HTTP URL"
        )
    return target


def parse_seconds(span: str | int | float) -> float:
    """Locust's run-time notation ('90', '90s', '1m30s', '1h') in seconds."""
    text = str(span).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not text or not match:
        raise LoadTestError(
            f"run time {span!r}: use seconds or Locust's notation, e.g. 60, 60s, 1m30s"
        )
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


# --- reading Locust's CSV --------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """One row of Locust's `_stats.csv` (times in milliseconds)."""

    name: str
    requests: int
    failures: int
    requests_per_s: float
    failures_per_s: float
    average_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _number(row: dict[str, str], key: str) -> float:
    value = (row.get(key) or "").strip()
    if value in ("", "N/A"):
        return 0.0
    return float(value)


def read_stats_csv(path: Path) -> dict[str, Stats]:
    """Every row of a Locust `_stats.csv`, by request name; the total is under 'Aggregated'."""
    path = Path(path)
    if not path.exists():
        raise LoadTestError(f"Locust wrote no statistics file {path}; see its log for why")
    rows: dict[str, Stats] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            name = row["Name"]
            rows[name] = Stats(
                name=name,
                requests=int(_number(row, "Request Count")),
                failures=int(_number(row, "Failure Count")),
                requests_per_s=_number(row, "Requests/s"),
                failures_per_s=_number(row, "Failures/s"),
                average_ms=_number(row, "Average Response Time"),
                p50_ms=_number(row, "50%"),
                p95_ms=_number(row, "95%"),
                p99_ms=_number(row, "99%"),
                max_ms=_number(row, "Max Response Time"),
            )
    if "Aggregated" not in rows:
        raise LoadTestError(f"{path} has no 'Aggregated' row; is it a Locust stats file?")
    return rows


def read_failures_csv(path: Path) -> list[tuple[str, str, int]]:
    """(request name, error, occurrences) from Locust's `_failures.csv`, most frequent first."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = [
            (row["Name"], row["Error"], int(row["Occurrences"] or 0))
            for row in csv.DictReader(handle)
        ]
    return sorted(rows, key=lambda r: -r[2])


# --- running Locust --------------------------------------------------------------------------


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
    csv_prefix = Path(csv_prefix)
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("_stats.csv", "_failures.csv", "_exceptions.csv", "_stats_history.csv"):
        Path(f"{csv_prefix}{suffix}").unlink(
            missing_ok=True
        )  # never report a previous run's numbers
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
        started = time.monotonic()
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
        )
        try:
            if on_spawned is not None and log is not None:
                _wait_for_spawn(proc, Path(log_path), started + deadline, on_spawned)
            returncode = proc.wait(max(0.1, started + deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise LoadTestError(
                f"Locust did not finish within {deadline:.0f} s and was stopped"
                + (f"; see {log_path}" if log else "")
            ) from None
        except BaseException:  # Ctrl-C: take Locust (and its --processes children) down too
            _kill_group(proc)
            raise
    finally:
        if log:
            log.close()
    stats_path = Path(f"{csv_prefix}_stats.csv")
    if not stats_path.exists():
        tail = locust_problem(log_path) if log else ""
        raise LoadTestError(
            f"Locust exited with status {returncode} and wrote no statistics"
            + (f": {tail}" if tail else "")
            + (f" (log: {log_path})" if log else "")
        )
    return LocustRun(
        returncode,
        read_stats_csv(stats_path),
        csv_prefix,
        html_path,
        log_path if log else None,
        read_failures_csv(Path(f"{csv_prefix}_failures.csv")),
    )


def _wait_for_spawn(
    proc: subprocess.Popen, log_path: Path, end: float, callback: Callable[[], None]
) -> None:
    """Poll Locust's log until it says every user runs (or Locust ends); then call `callback`."""
    while proc.poll() is None and time.monotonic() < end:
        if log_path.exists() and _SPAWNED_MARK in log_path.read_text(errors="replace"):
            callback()
            return
        time.sleep(0.05)


_SPAWNED_MARK = "All users spawned"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def locust_problem(log_path: Path | None) -> str:
    """The reason a Locust run did not get going, from its log: our locustfile's own error first."""
    if not log_path or not Path(log_path).exists():
        return ""
    lines = [
        line.strip()
        for line in Path(log_path).read_text(errors="replace").splitlines()
        if line.strip()
    ]
    for line in lines:
        if "/ERROR/mnist-loadtest:" in line:
            return line.split("/ERROR/mnist-loadtest:", 1)[1].strip()
    return _last_error_line(log_path)


def _last_error_line(log_path: Path | None) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    lines = [
        line.strip()
        for line in Path(log_path).read_text(errors="replace").splitlines()
        if line.strip()
    ]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def format_stats_table(stats: dict[str, Stats]) -> str:
    """A fixed-width table of every request name and the total, like Locust's own summary."""
    header = f"{'request':<24} {'calls':>8} {'fails':>6} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    lines = [header, "-" * len(header)]
    names = sorted(n for n in stats if n != "Aggregated") + ["Aggregated"]
    for name in names:
        s = stats[name]
        lines.append(
            f"{name:<24} {s.requests:>8} {s.failures:>6} {s.requests_per_s:>8.1f} "
            f"{s.p50_ms:>7.0f} {s.p95_ms:>7.0f} {s.p99_ms:>7.0f}"
        )
    return "\n".join(lines)
