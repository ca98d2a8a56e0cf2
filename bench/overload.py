"""Overload: what the server does at up to 4x the load it can carry.

    python -m bench.overload --model-repository model_repository [--seconds 8] [--images-per-call 16]

1. Capacity: closed-loop callers, back to back, give the calls/s the server carries (C).
2. Open loop at 0.5, 1, 2 and 4 x C (calls sent on a fixed schedule, whatever the answers): per
   load, the goodput (answered calls/s), the p50/p99 latency of the answered calls, how many
   calls were shed with RESOURCE_EXHAUSTED and how fast that refusal came, other errors, wrong
   answers (against the server's own idle answers for the same images) and the server's RSS.

The admitted calls' latency is bounded by the queue (--max-queue-size requests, each of
--images-per-call images) and the time per batch; calls beyond it are refused at once. Results
go to bench/results/overload.json and the figure to docs/figures/overload.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench import common
from bench.common import (
    CLASSIFY,
    ROOT,
    add_local_server_flags,
    idle_labels,
    largest_process_rss_mib,
    percentile_ms,
    require_test_images,
    server_rss_mib,
)
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.memory import process_tree
from serving.process import start_server

__all__ = ["CLASSIFY", "closed_loop", "main", "open_loop", "requests"]

HEADER = (
    f"{'load':>5} {'offered/s':>9} {'goodput/s':>9} {'ok':>6} {'shed':>6} {'other':>5} "
    f"{'wrong':>5} {'p50 ms':>7} {'p99 ms':>7} {'shed p50/p99':>12} "
    f"{'RSS MB start/max/end':>21} {'worker MB':>9}"
)


@dataclass
class LoadResult:
    factor: float  # offered load / capacity
    offered_per_s: float
    goodput_per_s: float
    ok: int
    shed: int  # RESOURCE_EXHAUSTED
    other_errors: int
    wrong: int
    p50_ms: float
    p99_ms: float
    shed_p50_ms: float  # how fast a refusal comes
    shed_p99_ms: float
    rss_start_mb: float
    rss_max_mb: float
    rss_end_mb: float
    worker_rss_max_mb: float  # the largest single process (a worker) at any sample

    def line(self) -> str:
        """This load's row under HEADER."""
        return (
            f"{self.factor:>4g}x {self.offered_per_s:>9.0f} {self.goodput_per_s:>9.0f} "
            f"{self.ok:>6} {self.shed:>6} {self.other_errors:>5} {self.wrong:>5} "
            f"{self.p50_ms:>7.1f} {self.p99_ms:>7.1f} "
            f"{self.shed_p50_ms:>5.1f}/{self.shed_p99_ms:<6.1f} "
            f"{self.rss_start_mb:>7.0f}/{self.rss_max_mb:.0f}/{self.rss_end_mb:.0f} "
            f"{self.worker_rss_max_mb:>9.0f}"
        )


@dataclass
class OpenLoopTally:
    """What came back from an open-loop run: answered and refused latencies, errors, RSS."""

    ok_latency: list[float] = field(default_factory=list)
    shed_latency: list[float] = field(default_factory=list)
    other: int = 0
    wrong: int = 0
    rss: list[float] = field(default_factory=list)
    worker_rss: list[float] = field(default_factory=list)

    def sample_rss(self, pid: int) -> None:
        self.rss.append(server_rss_mib(pid))
        self.worker_rss.append(largest_process_rss_mib(pid))

    def result(self, factor: float, offered_per_s: float, elapsed: float) -> LoadResult:
        ok, shed = self.ok_latency, self.shed_latency
        return LoadResult(
            factor=factor,
            offered_per_s=offered_per_s,
            goodput_per_s=len(ok) / elapsed,
            ok=len(ok),
            shed=len(shed),
            other_errors=self.other,
            wrong=self.wrong,
            p50_ms=percentile_ms(ok, 50),
            p99_ms=percentile_ms(ok, 99),
            shed_p50_ms=percentile_ms(shed, 50),
            shed_p99_ms=percentile_ms(shed, 99),
            rss_start_mb=self.rss[0],
            rss_max_mb=max(self.rss),
            rss_end_mb=self.rss[-1],
            worker_rss_max_mb=max(self.worker_rss),
        )


def requests(images: np.ndarray, per_call: int, count: int) -> list[tuple[bytes, np.ndarray]]:
    """`count` serialized Classify requests over the pool, with the pool indices each one holds."""
    out = []
    for i in range(count):
        index = (np.arange(per_call) + i * per_call) % len(images)
        message = pb.ClassifyRequest(
            images=[pb.Image(raw_pixels=images[j].tobytes()) for j in index]
        )
        out.append((message.SerializeToString(), index))
    return out


async def closed_loop(
    target: str, calls: list[tuple[bytes, np.ndarray]], callers: int, seconds: float
) -> float:
    """Calls/s with `callers` callers back to back: the capacity.

    More callers than the queue holds: some are shed (RESOURCE_EXHAUSTED), which is expected;
    any other error is not, and is raised.
    """
    sample = await common.closed_loop(
        target, [data for data, _ in calls], callers=callers, seconds=seconds, method=CLASSIFY
    )
    if sample.errors > sample.shed:
        raise RuntimeError(f"{sample.errors - sample.shed} calls failed measuring the capacity")
    return sample.calls_per_s


async def open_loop(
    target: str,
    calls: list[tuple[bytes, np.ndarray]],
    reference: np.ndarray,
    rate: float,
    seconds: float,
    pid: int,
    factor: float,
    channels: int = 4,
) -> LoadResult:
    """Send `rate` calls/s on a fixed schedule for `seconds`; gather what came back."""
    pool = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [
        ch.unary_unary(CLASSIFY, response_deserializer=pb.ClassifyResponse.FromString)
        for ch in pool
    ]
    tally = OpenLoopTally()
    tally.sample_rss(pid)

    async def one(i: int) -> None:
        data, index = calls[i % len(calls)]
        started = time.perf_counter()
        try:
            response = await stubs[i % channels](data, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.shed_latency.append(time.perf_counter() - started)
            else:
                tally.other += 1
            return
        tally.ok_latency.append(time.perf_counter() - started)
        labels = np.array([p.label for p in response.predictions])
        tally.wrong += int((labels != reference[index]).sum())

    start = time.monotonic()
    total = int(rate * seconds)
    await on_schedule(one, rate, total, every_second=lambda: tally.sample_rss(pid))
    elapsed = time.monotonic() - start
    tally.rss.append(server_rss_mib(pid))
    for ch in pool:
        await ch.close()
    return tally.result(factor, total / seconds, elapsed)


async def on_schedule(send, rate: float, total: int, every_second) -> None:
    """Start `send(i)` for i < `total` at `rate` a second whatever the answers (an open loop),
    call `every_second` about once a second meanwhile, and wait for all of them."""
    tasks = []
    start = time.monotonic()
    next_sample = start + 1.0
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(i)))
        if time.monotonic() >= next_sample:
            every_second()
            next_sample += 1.0
    await asyncio.gather(*tasks)


def plot(results: list[LoadResult], capacity: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [r.offered_per_s for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(offered, offered, ":", color="grey", label="offered")
    left.plot(offered, [r.goodput_per_s for r in results], "o-", label="answered (goodput)")
    left.plot(
        offered,
        [r.shed / (r.ok + r.shed + r.other_errors) * r.offered_per_s for r in results],
        "s--",
        label="shed: RESOURCE_EXHAUSTED",
    )
    left.axvline(capacity, color="red", alpha=0.3, label=f"capacity {capacity:.0f}/s")
    left.set_xlabel("offered calls/s")
    left.set_ylabel("calls/s")
    left.legend(fontsize=8)
    right.plot(offered, [r.p99_ms for r in results], "o-", label="p99, answered calls")
    right.plot(offered, [r.p50_ms for r in results], "^-", label="p50, answered calls")
    right.plot(offered, [r.shed_p99_ms for r in results], "s--", label="p99 of a refusal")
    right.axvline(capacity, color="red", alpha=0.3)
    right.set_xlabel("offered calls/s")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per load level")
    # 64 images per call: the server's work per call dwarfs the client's, so one client process can
    # offer 4x what the server carries (with small calls the load generator saturates first).
    parser.add_argument("--images-per-call", type=int, default=64)
    parser.add_argument(
        "--max-queue-size", type=int, default=8, help="the server's --max-queue-size"
    )
    parser.add_argument(
        "--callers", type=int, default=32, help="closed-loop callers for the capacity"
    )
    add_local_server_flags(parser)
    parser.add_argument(
        "--factors", default="0.5,1,2,4", help="offered load as multiples of the capacity"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "overload.png")
    return parser, parser.parse_args(argv)


def measure_levels(server, args, images: np.ndarray) -> tuple[float, list[LoadResult], int]:
    """The capacity, then each load level printed as it is measured; and the server's processes."""
    calls = requests(images, args.images_per_call, 512)
    with ClassifierClient(server.target, timeout=60) as client:
        reference = idle_labels(client.classify, images)
    capacity = asyncio.run(closed_loop(server.target, calls, args.callers, args.seconds))
    print(
        f"capacity: {capacity:.0f} calls/s of {args.images_per_call} images "
        f"({args.callers} closed-loop callers)"
    )
    print(HEADER)
    results = []
    for factor in (float(f) for f in args.factors.split(",")):
        load = open_loop(
            server.target,
            calls,
            reference,
            factor * capacity,
            args.seconds,
            server.proc.pid,
            factor,
        )
        results.append(asyncio.run(load))
        print(results[-1].line())
    processes = len(process_tree(server.proc.pid))
    print(f"RSS: summed over all {processes} server processes; worker MB: the largest one")
    return capacity, results, processes


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    images = require_test_images(parser, args.data_dir, 2048)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server_args = ("--workers", str(args.workers), "--max-queue-size", str(args.max_queue_size))
    with start_server(
        args.model_repository,
        *server_args,
        "--http-port",
        "0",
        log_path=args.out.with_suffix(".log"),
        ready_timeout=300,  # several workers start slowly on a loaded machine
    ) as server:
        capacity, results, processes = measure_levels(server, args, images)
    figures = {
        "capacity_per_s": capacity,
        "images_per_call": args.images_per_call,
        "max_queue_size": args.max_queue_size,
        "server_processes": processes,
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(figures, indent=2))
    title = (
        f"Classify, {args.images_per_call} images per call, --max-queue-size "
        f"{args.max_queue_size}, --workers {args.workers or 'default (one per core)'}"
    )
    plot(results, capacity, args.figure, title)
    print(f"wrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
