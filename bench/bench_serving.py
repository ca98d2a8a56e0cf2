"""Throughput and latency of mnist-serve over loopback, beside its two ceilings, in one run.

Scenarios (callers × images per call): 1×1, 32×1, 8×64. Each runs, in alternating slices, against
  - mnist-serve (dynamic batching, onnxruntime on the CPU),
  - a canned server: the same gRPC stack answering without any model (the RPC ceiling),
and the model's own ceiling is onnxruntime called in-process on the same batches.
The load generator is this process (grpc.aio, requests serialized once up front),
so on a small machine it competes with the server for the cores: read ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from core.contract import INPUT_NAME, to_model_input
from core.idx import find_data_dir, load_idx_dir
from core.repository import load_version
from serving.config import ServeConfig
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import free_port, start_server, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = [(1, 1), (32, 1), (8, 64)]
CLASSIFY = "/mnist.v1.Classifier/Classify"


@dataclass
class Result:
    target: str
    callers: int
    images_per_call: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float


async def drive(target: str, callers: int, images: np.ndarray, seconds: float, warmup: float = 0.3) -> list[float]:
    """`callers` coroutines each sending back-to-back Classify calls for `seconds`; the latencies."""
    payload = pb.ClassifyRequest(images=[pb.Image(raw_pixels=i.tobytes()) for i in images]).SerializeToString()
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(CLASSIFY)  # bytes in, bytes out: the generator spends no time on protobuf
        await call(payload, timeout=30)
        measuring_from = time.perf_counter() + warmup
        until = measuring_from + seconds

        async def caller():
            while (now := time.perf_counter()) < until:
                await call(payload, timeout=30)
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies


def summarize(name: str, callers: int, count: int, latencies: list[float], seconds: float) -> Result:
    latencies = sorted(latencies)
    rps = len(latencies) / seconds
    return Result(name, callers, count, rps, rps * count,
                  1000 * statistics.median(latencies), 1000 * latencies[int(0.99 * (len(latencies) - 1))])


def compare(targets: dict[str, str], callers: int, images: np.ndarray, rounds: int, seconds: float) -> list[Result]:
    """Alternate short slices between the servers, so the machine's drifts hit both alike."""
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, target in targets.items():
            latencies[name] += asyncio.run(drive(target, callers, images, seconds))
    return [summarize(name, callers, len(images), values, rounds * seconds) for name, values in latencies.items()]


def in_process(model_path: str, batch: np.ndarray, seconds: float, threads: int) -> float:
    """Images/s of onnxruntime alone on `batch`, same thread settings as the server."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: to_model_input(batch)}
    for _ in range(20):
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-version", type=int, help="default: the newest")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per scenario and server")
    parser.add_argument("--rounds", type=int, default=6,
                        help="slices the seconds are cut into, alternating between the servers")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="server's onnxruntime threads (default: the server's default)")
    parser.add_argument("--server-args", default="", help="extra mnist-serve flags, e.g. '--max-queue-delay-us 200'")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    version = load_version(Path(args.model_repository), "mnist", args.model_version)
    images = load_idx_dir(find_data_dir("mnist") or ROOT.parent / "shared/datasets/mnist").test_images
    server_args = args.server_args.split() + ["--model-version", str(version.version)]
    if args.intra_op_threads is not None:
        server_args += ["--intra-op-threads", str(args.intra_op_threads)]
    threads = args.intra_op_threads if args.intra_op_threads is not None else ServeConfig().intra_op_threads

    results: list[Result] = []
    port = free_port()
    canned = subprocess.Popen([sys.executable, "-m", "bench.canned_server", "--port", str(port)], cwd=ROOT)
    try:
        wait_until_serving(f"127.0.0.1:{port}", 30, canned)
        with start_server(args.model_repository, "--metrics-port", "0", *server_args) as server:
            for callers, count in SCENARIOS:
                targets = {"mnist-serve": server.target, "canned": f"127.0.0.1:{port}"}
                results += compare(targets, callers, images[:count], args.rounds, args.seconds / args.rounds)
    finally:
        canned.terminate()
        canned.wait()
    ceiling = {n: in_process(str(version.model_path), images[:n], args.seconds, threads) for n in (1, 64)}

    by = {(r.target, r.callers, r.images_per_call): r for r in results}
    print(f"model {version.name} v{version.version}; {os.cpu_count()} cores; onnxruntime intra-op threads {threads}; "
          f"{args.seconds:g} s per scenario; extra server flags: {args.server_args or 'none'}")
    print(f"in-process onnxruntime: {ceiling[1]:,.0f} images/s at batch 1, {ceiling[64]:,.0f} images/s at batch 64")
    header = (f"{'scenario':<12}{'server':<13}{'req/s':>9}{'images/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
              f"  vs ceiling")
    print(header)
    print("-" * len(header))
    for callers, count in SCENARIOS:
        real, rpc = by[("mnist-serve", callers, count)], by[("canned", callers, count)]
        for r in (real, rpc):
            if r is rpc:
                note = ""
            elif count == 64:
                note = f"{r.images_per_s / ceiling[64]:.2f}x in-process images/s"
            elif callers == 1:
                gap, model_ms = r.p50_ms - rpc.p50_ms, 1000 / ceiling[1]
                note = (f"p50 +{gap:.3f} ms over canned: onnxruntime's own {model_ms:.3f} ms "
                        f"+ {gap - model_ms:.3f} ms of server")
            else:
                note = f"{r.requests_per_s / rpc.requests_per_s:.2f}x canned req/s"
            print(f"{f'{callers} x {count}':<12}{r.target:<13}{r.requests_per_s:>9,.0f}{r.images_per_s:>10,.0f}"
                  f"{r.p50_ms:>8.3f}{r.p99_ms:>8.3f}  {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "in_process": ceiling,
                                         "threads": threads, "server_args": args.server_args}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
