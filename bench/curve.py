"""Latency against throughput, mnist-serve beside the naive server: a concurrency sweep like
perf_analyzer's (`--concurrency-range 1:128` doubling), at 1 and at 64 images per call.

Each point is `concurrency` callers sending KServe v2 ModelInfer FP32 calls back to back (the
closed-loop generator of bench/common.py), from one connection (gRPC's single channel, the default)
or spread over `--connections N`. The two servers alternate point by point, in the same run, so the
machine's drifts hit both alike. Prints calls/s, images/s, p50 and p99 per point, writes them as CSV
and draws latency (p50 and p99) against throughput, one panel per call size:

    python -m bench.curve --model-repository model_repository      # docs/figures/curve.png
    python -m bench.curve --connections 8 --out docs/figures/curve_8conn.png
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from bench.common import (
    ROOT,
    measure,
    merge,
    percentile_ms,
    start_module_server,
    table,
    test_images,
    usable_cores,
)
from bench.serving_scenarios import NAIVE, QUIET_PORTS, SERVE, infer_payload
from core.repository import RepositoryError, load_version
from serving.process import start_server

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128)
SIZES = (1, 64)
COLUMNS = (
    ("server", ""),
    ("images/call", "d"),
    ("concurrency", "d"),
    ("calls/s", ",.0f"),
    ("images/s", ",.0f"),
    ("p50 ms", ".2f"),
    ("p99 ms", ".2f"),
    ("errors", "d"),
)


def sweep(
    targets: dict[str, str],
    payloads: dict[int, dict[str, bytes]],
    concurrency: list[int],
    connections: int,
    seconds: float,
    rounds: int,
) -> list[dict[str, object]]:
    """One row per server, call size and concurrency; servers alternate within each point."""
    rows = []
    for size, by_server in payloads.items():
        for callers in concurrency:
            parts: dict[str, list] = {name: [] for name in targets}
            for _ in range(rounds):
                for name, target in targets.items():
                    parts[name].append(
                        measure(
                            target,
                            by_server[name],
                            callers=callers,
                            connections=connections,
                            seconds=seconds / rounds,
                        )
                    )
            for name, pieces in parts.items():
                sample = merge(pieces)
                rows.append(
                    {
                        "server": name,
                        "images/call": size,
                        "concurrency": callers,
                        "calls/s": sample.calls_per_s,
                        "images/s": sample.calls_per_s * size,
                        "p50 ms": percentile_ms(sample.latencies, 50),
                        "p99 ms": percentile_ms(sample.latencies, 99),
                        "errors": sample.errors,
                    }
                )
                print(table([rows[-1]], COLUMNS, 11).splitlines()[-1], flush=True)
    return rows


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({int(r["images/call"]) for r in rows})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.6), squeeze=False)
    colours = {SERVE: "tab:blue", NAIVE: "tab:orange"}
    for axis, size in zip(axes[0], sizes):
        for server in (SERVE, NAIVE):
            points = [r for r in rows if r["server"] == server and r["images/call"] == size]
            x = [float(r["images/s"]) for r in points]
            colour = colours.get(server, None)
            axis.plot(x, [r["p50 ms"] for r in points], "o-", color=colour, label=f"{server} p50")
            axis.plot(
                x,
                [r["p99 ms"] for r in points],
                "s--",
                color=colour,
                alpha=0.7,
                label=f"{server} p99",
            )
            for r, xi in zip(points, x):
                axis.annotate(
                    str(r["concurrency"]),
                    (xi, float(r["p50 ms"])),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                    color=colour,
                )
        axis.set_yscale("log")
        axis.set_xlabel("images/s" + (" (= calls/s)" if size == 1 else ""))
        axis.set_ylabel("latency, ms (log)")
        axis.set_title(f"{size} image{'s' if size > 1 else ''} per call; labels: concurrency")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated caller counts",
    )
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="images per call")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections the callers share (1: one channel; N: spread over N)",
    )
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measured seconds per point and server"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating slices per point")
    parser.add_argument("--server-args", default="", help="extra mnist-serve flags")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures/curve.png")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--concurrency and --sizes take comma-separated whole numbers, e.g. 1,2,4")
    if min(args.concurrency + args.sizes) < 1 or args.connections < 1 or args.rounds < 1:
        parser.error("--concurrency, --sizes, --connections and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_version(Path(args.model_repository), args.model_name)
    except RepositoryError as err:
        print(f"curve: error: {err}", file=sys.stderr)
        return 1
    images = test_images()
    load = os.getloadavg()[0]  # printed with the figures: on a shared machine they depend on it
    with ExitStack() as stack:
        naive, _ = start_module_server(
            stack, "bench.naive_server", "--model", str(model.model_path)
        )
        serve = stack.enter_context(
            start_server(
                args.model_repository,
                *QUIET_PORTS,
                "--model-name",
                model.name,
                *args.server_args.split(),
            )
        )
        targets = {SERVE: serve.target, NAIVE: naive}
        payloads = {
            size: dict.fromkeys(targets, infer_payload(images[:size], model.name))
            for size in args.sizes
        }
        print(table([], COLUMNS, 11), flush=True)
        rows = sweep(
            targets, payloads, args.concurrency, args.connections, args.seconds, args.rounds
        )
    connection_text = (
        "one connection" if args.connections == 1 else f"{args.connections} connections"
    )
    title = (
        f"{model.name} v{model.version}, KServe v2 ModelInfer FP32, {connection_text}, "
        f"{usable_cores()} cores shared with the load generator (load average {load:.1f} at the "
        f"start); mnist-serve flags: {args.server_args or 'defaults'}"
    )
    plot(rows, args.out, title)
    with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
