"""`make batching-study`: what dynamic batching buys, measured with Locust.

The same load runs against mnist-serve started with `--max-batch-size 1` (every call is its
own onnxruntime run) and with batching on (default 64), at several user counts. Requests/s
and p99 come from Locust's stats CSV; the mean batch the server actually ran comes from its
`mnist_batch_size` / `mnist_batch_requests` histograms on /metrics.

    python -m loadtest.batching_study --model-repository model_repository
    python -m loadtest.batching_study --users 1,16,64,128 --run-time 30s --max-batch-sizes 1,16,64

Writes reports/<name>.csv, reports/<name>.md and reports/<name>.png (throughput and p99 against
users, one line per setting), plus each run's Locust CSVs under reports/<name>/.
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import sys
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.locust_args import LoadTestError, parse_mix_weights, parse_seconds
from loadtest.locust_runner import ROOT, run_locust
from loadtest.options import DEFAULTS, SCENARIOS

PROG = "batching-study"


@dataclass
class Point:
    """One Locust run: a server setting and a user count."""

    max_batch_size: int
    users: int
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_images: float | None  # images per onnxruntime call during the run
    mean_batch_requests: float | None  # calls coalesced into one onnxruntime call


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive integers separated by commas, e.g. 1,8,32,64"
        )
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[1].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--users", type=int_list, default=[1, 8, 32, 64], help="user counts, comma-separated"
    )
    parser.add_argument(
        "--max-batch-sizes",
        type=int_list,
        default=[1, 64],
        help="mnist-serve --max-batch-size settings to compare; 1 turns batching off",
    )
    parser.add_argument(
        "--run-time", "-t", default="15s", help="length of each run (Locust notation)"
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="single",
        help="the load; single-image calls are where batching matters (batch calls need "
        "--images-per-call <= every max batch size)",
    )
    parser.add_argument("--images-per-call", type=int, default=DEFAULTS.images_per_call)
    parser.add_argument("--mix-weights", default=DEFAULTS.mix_weights_text)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULTS.pool_size,
        help="test images screened for the load pool",
    )
    parser.add_argument(
        "--processes", type=int, default=None, help="Locust worker processes (see run.py)"
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="further mnist-serve flags for both settings, e.g. --server-args='--max-queue-delay-us 500'",
    )
    parser.add_argument("--reports-dir", type=Path, default=ROOT / "reports")
    parser.add_argument("--name", default="batching_study", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    try:
        parse_seconds(args.run_time)
        weights = parse_mix_weights(args.mix_weights)
    except LoadTestError as error:
        parser.error(str(error))
    batch_calls = args.scenario == "batch" or (args.scenario == "mix" and weights[1] > 0)
    if batch_calls and args.images_per_call > min(args.max_batch_sizes):
        parser.error(
            f"--scenario {args.scenario} sends {args.images_per_call} images per call, more than a server "
            f"with --max-batch-size {min(args.max_batch_sizes)} accepts; use --scenario single or kserve"
        )
    if "--max-batch-size" in args.server_args:
        parser.error("set the batch sizes with --max-batch-sizes, not inside --server-args")
    return args


def scrape_batch_totals(metrics_url: str) -> dict[str, float]:
    """The running sums and counts of the server's batch histograms (0 when not exported)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(
            r"^(mnist_batch_(?:size|requests)_(?:sum|count))(?:\{[^}]*\})?\s+(\S+)", line
        )
        if match:
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals


def _mean(before: dict[str, float], after: dict[str, float], metric: str) -> float | None:
    count = after.get(f"{metric}_count", 0.0) - before.get(f"{metric}_count", 0.0)
    if count <= 0:
        return None
    return (after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)) / count


def measure(args: argparse.Namespace) -> list[Point]:
    if not args.model_repository.is_dir():
        raise LoadTestError(
            f"model repository {args.model_repository} does not exist: train a model first "
            "(make train) or pass --model-repository"
        )
    runs_dir = args.reports_dir / args.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    points = []
    for max_batch in args.max_batch_sizes:
        with _start_server(args, max_batch, runs_dir) as server:
            for users in args.users:
                points.append(_measure_point(args, server, max_batch, users, runs_dir))
    return points


def _start_server(args: argparse.Namespace, max_batch: int, runs_dir: Path):
    """mnist-serve at one --max-batch-size, its log in the run's folder."""
    from serving.process import start_server

    log_path = runs_dir / f"server-max-batch-{max_batch}.log"
    try:
        return start_server(
            args.model_repository,
            "--max-batch-size",
            str(max_batch),
            *shlex.split(args.server_args),
            log_path=log_path,
        )
    except (RuntimeError, TimeoutError, OSError) as error:
        raise LoadTestError(
            f"mnist-serve --max-batch-size {max_batch} did not start: {error} (log: {log_path})"
        ) from None


def _measure_point(
    args: argparse.Namespace, server, max_batch: int, users: int, runs_dir: Path
) -> Point:
    """One Locust run of `users` against the server; the batch metrics over its measured window."""
    label = f"max-batch-{max_batch}-users-{users}"
    print(f"{PROG}: --max-batch-size {max_batch}, {users} users, {args.run_time} ...", flush=True)
    before: dict[str, float] = {}

    def window_starts(url: str = server.metrics_url, into: dict = before) -> None:
        into.update(scrape_batch_totals(url))  # after the pool screening, as users start

    run = run_locust(
        server.target,
        scenario=args.scenario,
        users=users,
        spawn_rate=users,
        run_time=args.run_time,
        csv_prefix=runs_dir / label,
        log_path=runs_dir / f"{label}.log",
        processes=args.processes,
        images_per_call=args.images_per_call,
        mix_weights=args.mix_weights,
        reset_stats=True,
        extra=["--pool-size", str(args.pool_size)],
        on_spawned=window_starts,
    )
    after = scrape_batch_totals(server.metrics_url)
    total = run.total
    if total.requests == 0:
        raise LoadTestError(
            f"no call completed with {users} users against --max-batch-size "
            f"{max_batch}; see {run.log_path}"
        )
    return Point(
        max_batch,
        users,
        total.requests,
        total.failures,
        total.requests_per_s,
        total.p50_ms,
        total.p99_ms,
        _mean(before, after, "mnist_batch_size"),
        _mean(before, after, "mnist_batch_requests"),
    )


def _setting(max_batch: int) -> str:
    return "off (max batch 1)" if max_batch == 1 else f"on (max batch {max_batch})"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(points: list[Point], args: argparse.Namespace) -> str:
    lines = [
        f"Locust `{args.scenario}` scenario, {args.run_time} per run, closed loop (no think time).",
        "",
        "| batching | users | requests/s | p50 ms | p99 ms | calls per batch | images per batch | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {_setting(p.max_batch_size)} | {p.users} | {p.requests_per_s:.1f} | {p.p50_ms:.0f} | "
            f"{p.p99_ms:.0f} | {_fmt(p.mean_batch_requests)} | {_fmt(p.mean_batch_images)} | "
            f"{p.failures} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(points: list[Point], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        for point in points:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(point).items()})


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for max_batch in sorted({p.max_batch_size for p in points}):
        series = sorted((p for p in points if p.max_batch_size == max_batch), key=lambda p: p.users)
        users = [p.users for p in series]
        style = dict(
            marker="o",
            linestyle="--" if max_batch == 1 else "-",
            label=f"batching {_setting(max_batch)}",
        )
        left.plot(users, [p.requests_per_s for p in series], **style)
        right.plot(users, [p.p99_ms for p in series], **style)
    all_users = sorted({p.users for p in points})
    for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        if len(all_users) > 1 and all_users[-1] / all_users[0] >= 8:
            axis.set_xscale("log", base=2)
        axis.set_xticks(all_users, [str(u) for u in all_users])
        axis.set_xlabel("concurrent users (Locust)")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set_title("Throughput")
    right.set_title("Tail latency")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.reports_dir.mkdir(parents=True, exist_ok=True)
        points = measure(args)
    except LoadTestError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    stem = args.reports_dir / args.name
    table = markdown_table(points, args)
    Path(f"{stem}.md").write_text(
        f"# Dynamic batching study\n\n{table}\n![throughput and p99]({args.name}.png)\n"
    )
    write_csv(points, Path(f"{stem}.csv"))
    plot(
        points,
        Path(f"{stem}.png"),
        f"mnist-serve, batching off vs on: Locust '{args.scenario}' load, {args.run_time} per point",
    )
    print()
    print(table)
    print(f"{PROG}: wrote {stem}.md, {stem}.csv, {stem}.png")
    failures = sum(p.failures for p in points)
    if failures:
        print(
            f"{PROG}: FAILED: {failures} calls failed across the runs; see the _failures.csv files in "
            f"{args.reports_dir / args.name}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
