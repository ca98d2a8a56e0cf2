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
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from core.idx import find_data_dir, load_idx_dir
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.memory import process_tree, tree_rss_by_process, tree_rss_bytes
from serving.process import start_server

ROOT = Path(__file__).resolve().parent.parent
CLASSIFY = "/mnist.v1.Classifier/Classify"


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


def rss_mb(pid: int) -> float:
    """The server's RSS summed over all its processes (with --workers the parent loads no model)."""
    return tree_rss_bytes(pid) / 2**20


def worker_rss_mb(pid: int) -> float:
    """The largest single process of the server: what one worker's share of a memory limit must hold."""
    return max(tree_rss_by_process(pid).values(), default=0) / 2**20


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
    """Calls/s with `callers` callers back to back: the capacity."""
    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_unary(CLASSIFY)
    done = 0
    stop = time.monotonic() + seconds

    async def caller(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < stop:
            try:
                await call(calls[i % len(calls)][0], timeout=30)
                done += 1
            except (
                grpc.aio.AioRpcError
            ) as error:  # more callers than the queue holds: some are shed
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            i += callers

    started = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    rate = done / (time.monotonic() - started)
    await channel.close()
    return rate


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
    ok_latency: list[float] = []
    shed_latency: list[float] = []
    other = wrong = 0
    rss, worker_rss = [rss_mb(pid)], [worker_rss_mb(pid)]

    async def one(i: int) -> None:
        nonlocal other, wrong
        data, index = calls[i % len(calls)]
        started = time.perf_counter()
        try:
            response = await stubs[i % channels](data, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                shed_latency.append(time.perf_counter() - started)
            else:
                other += 1
            return
        ok_latency.append(time.perf_counter() - started)
        labels = np.array([p.label for p in response.predictions])
        wrong += int((labels != reference[index]).sum())

    tasks = []
    start = time.monotonic()
    total = int(rate * seconds)
    next_sample = start + 1.0
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
        if time.monotonic() >= next_sample:
            rss.append(rss_mb(pid))
            worker_rss.append(worker_rss_mb(pid))
            next_sample += 1.0
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    rss.append(rss_mb(pid))
    for ch in pool:
        await ch.close()
    ms = lambda values, q: float(np.percentile(values, q) * 1000) if values else float("nan")  # noqa: E731
    return LoadResult(
        factor=factor,
        offered_per_s=total / seconds,
        goodput_per_s=len(ok_latency) / elapsed,
        ok=len(ok_latency),
        shed=len(shed_latency),
        other_errors=other,
        wrong=wrong,
        p50_ms=ms(ok_latency, 50),
        p99_ms=ms(ok_latency, 99),
        shed_p50_ms=ms(shed_latency, 50),
        shed_p99_ms=ms(shed_latency, 99),
        rss_start_mb=rss[0],
        rss_max_mb=max(rss),
        rss_end_mb=rss[-1],
        worker_rss_max_mb=max(worker_rss),
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX folder (default: $MNIST_DATA_DIR)"
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
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="the server's --workers (0: its default, one per core); RSS is summed over them",
    )
    parser.add_argument(
        "--factors", default="0.5,1,2,4", help="offered load as multiples of the capacity"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "overload.png")
    args = parser.parse_args(argv)

    folder = find_data_dir("mnist", args.data_dir)
    if folder is None:
        parser.error("the MNIST files are needed: pass --data-dir or set MNIST_DATA_DIR")
    images = np.ascontiguousarray(load_idx_dir(folder).test_images[:2048])
    calls = requests(images, args.images_per_call, 512)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server_args = (
        "--workers",
        str(args.workers),
        "--max-queue-size",
        str(args.max_queue_size),
        "--http-port",
        "0",
    )
    with start_server(
        args.model_repository,
        *server_args,
        log_path=args.out.with_suffix(".log"),
        ready_timeout=300,
    ) as server:  # several workers start slowly on a loaded machine
        with ClassifierClient(server.target, timeout=60) as client:
            reference = np.concatenate(
                [client.classify(images[i : i + 64]).labels for i in range(0, len(images), 64)]
            )
        capacity = asyncio.run(closed_loop(server.target, calls, args.callers, args.seconds))
        print(
            f"capacity: {capacity:.0f} calls/s of {args.images_per_call} images ({args.callers} closed-loop callers)"
        )
        print(
            f"{'load':>5} {'offered/s':>9} {'goodput/s':>9} {'ok':>6} {'shed':>6} {'other':>5} {'wrong':>5} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'shed p50/p99':>12} {'RSS MB start/max/end':>21} {'worker MB':>9}"
        )
        results = []
        for factor in (float(f) for f in args.factors.split(",")):
            result = asyncio.run(
                open_loop(
                    server.target,
                    calls,
                    reference,
                    factor * capacity,
                    args.seconds,
                    server.proc.pid,
                    factor,
                )
            )
            results.append(result)
            print(
                f"{factor:>4g}x {result.offered_per_s:>9.0f} {result.goodput_per_s:>9.0f} {result.ok:>6} "
                f"{result.shed:>6} {result.other_errors:>5} {result.wrong:>5} {result.p50_ms:>7.1f} "
                f"{result.p99_ms:>7.1f} {result.shed_p50_ms:>5.1f}/{result.shed_p99_ms:<6.1f} "
                f"{result.rss_start_mb:>7.0f}/{result.rss_max_mb:.0f}/{result.rss_end_mb:.0f} "
                f"{result.worker_rss_max_mb:>9.0f}"
            )
        processes = len(process_tree(server.proc.pid))
        print(f"RSS: summed over all {processes} server processes; worker MB: the largest one")
    args.out.write_text(
        json.dumps(
            {
                "capacity_per_s": capacity,
                "images_per_call": args.images_per_call,
                "max_queue_size": args.max_queue_size,
                "server_processes": processes,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    plot(
        results,
        capacity,
        args.figure,
        f"Classify, {args.images_per_call} images per call, --max-queue-size {args.max_queue_size}, "
        f"--workers {args.workers or 'default (one per core)'}",
    )
    print(f"wrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
