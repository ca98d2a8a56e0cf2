"""Locust's results as we report them: its `_stats.csv` and `_failures.csv` read back (so what
we print is what its HTML report shows), the fixed-width table, and why a run did not get going,
from its log.

Only the standard library is imported: the locustfile's helpers import this module too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from loadtest.locust_args import LoadTestError


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


def format_stats_table(stats: dict[str, Stats]) -> str:
    """A fixed-width table of every request name and the total, like Locust's own summary."""
    header = (
        f"{'request':<24} {'calls':>8} {'fails':>6} {'req/s':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    )
    lines = [header, "-" * len(header)]
    names = sorted(n for n in stats if n != "Aggregated") + ["Aggregated"]
    for name in names:
        s = stats[name]
        lines.append(
            f"{name:<24} {s.requests:>8} {s.failures:>6} {s.requests_per_s:>8.1f} "
            f"{s.p50_ms:>7.0f} {s.p95_ms:>7.0f} {s.p99_ms:>7.0f}"
        )
    return "\n".join(lines)


def locust_problem(log_path: Path | None) -> str:
    """The reason a Locust run did not get going, from its log: our locustfile's own error first."""
    lines = _log_lines(log_path)
    for line in lines:
        if "/ERROR/mnist-loadtest:" in line:
            return line.split("/ERROR/mnist-loadtest:", 1)[1].strip()
    return _last_error_line(lines)


def _log_lines(log_path: Path | None) -> list[str]:
    """The log's non-blank lines, stripped; none when there is no log."""
    if not log_path or not Path(log_path).exists():
        return []
    return [
        line.strip()
        for line in Path(log_path).read_text(errors="replace").splitlines()
        if line.strip()
    ]


def _last_error_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[-300:]
    return lines[-1][-300:] if lines else ""
