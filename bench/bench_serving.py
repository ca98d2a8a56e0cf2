"""Throughput and latency of mnist-serve over loopback, against a naive server and two ceilings, in one run.

Scenarios (callers × images per call): 1×1, 32×1, 8×64, all as KServe v2 ModelInfer FP32 calls
(raw_input_contents). Each scenario runs, in alternating slices, against
  - mnist-serve, the product (dynamic batching, onnxruntime on the CPU), with the FP32 model,
  - mnist-serve with the INT8 model (`<model>_int8`, when the repository has it),
  - the naive baseline (bench/naive_server.py): synchronous gRPC, 16 threads, session.run per call,
    onnxruntime's default threads, no batching. Every figure is reported as a ratio to it;
  - a canned server: the same gRPC stack answering without any model (the RPC ceiling).
The model's own ceiling is onnxruntime called in-process on the same batches, at several thread
settings (the best one is the goal's reference).
The load generator is this process (grpc.aio, one connection per caller so that the kernel spreads
them over --workers, requests serialized once up front), so on a small machine it competes with the
servers for the cores: read ratios, not absolutes. To show where the cores go, each server's CPU
time (its process and its workers, all threads) is measured over its slices and printed per call,
beside the load generator's own.
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
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from core.contract import IMAGE_SHAPE, INPUT_NAME, to_model_input
from core.idx import find_data_dir, load_idx_dir
from core.repository import RepositoryError, load_version
from serving.generated import grpc_predict_v2_pb2 as kserve_pb
from serving.process import free_port, start_server, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = [(1, 1), (32, 1), (8, 64)]
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
QUIET_PORTS = ("--metrics-port", "0", "--http-port", "0")  # only gRPC is measured; two servers run at once
NAIVE, CANNED, SERVE, SERVE_INT8 = "naive", "canned", "mnist-serve", "serve-int8"

# The goals, checked on every run.
GOAL_32X1_VS_NAIVE = 1.3
GOAL_32X1_VS_CANNED = 0.70
GOAL_8X64_VS_IN_PROCESS = 0.90
GOAL_1X1_P50_OVER_CANNED_MS = 0.15


@dataclass
class Result:
    target: str
    callers: int
    images_per_call: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms_per_call: float  # CPU time of the server's processes (all threads) per answered call
    client_cpu_ms_per_call: float  # the load generator's (this process's) CPU time per answered call


def infer_payload(images: np.ndarray, model_name: str) -> bytes:
    """One serialized ModelInfer request: FP32 [n, 28, 28, 1] in raw_input_contents."""
    batch = to_model_input(images)
    request = kserve_pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[len(batch), *IMAGE_SHAPE])
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request.SerializeToString()


async def drive(target: str, callers: int, payload: bytes, seconds: float, warmup: float = 0.3,
                on_window: Callable[[], None] | None = None) -> tuple[list[float], int]:
    """`callers` coroutines, each on its own connection, sending back-to-back calls; latencies and errors.

    `on_window` is called when the measured window (after `warmup`) opens and when it closes.
    """
    latencies: list[float] = []
    errors = 0
    # A local subchannel pool gives each channel its own TCP connection (gRPC shares them otherwise),
    # so that with SO_REUSEPORT the kernel spreads callers over the server's worker processes.
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(callers)]
    try:
        calls = [channel.unary_unary(MODEL_INFER) for channel in channels]  # bytes in, bytes out
        await asyncio.gather(*(call(payload, timeout=30) for call in calls))
        measuring_from = time.perf_counter() + warmup
        until = measuring_from + seconds
        if on_window is not None:
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + warmup, on_window)

        async def caller(call):
            nonlocal errors
            while (now := time.perf_counter()) < until:
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller(call) for call in calls))
        if on_window is not None:
            on_window()
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return latencies, errors


def summarize(name: str, callers: int, count: int, latencies: list[float], errors: int, seconds: float,
              server_cpu: float = float("nan"), client_cpu: float = float("nan")) -> Result:
    calls = len(latencies) or 1
    latencies = sorted(latencies) or [float("nan")]
    rps = len(latencies) / seconds
    return Result(name, callers, count, rps, rps * count, 1000 * statistics.median(latencies),
                  1000 * latencies[int(0.99 * (len(latencies) - 1))], errors,
                  1000 * server_cpu / calls, 1000 * client_cpu / calls)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` and its children (the --workers), all threads."""
    if pid is None:
        return float("nan")
    import psutil  # with Locust (the loadtest extra), as `make bench` has it

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def compare(targets: dict[str, tuple[str, bytes, int | None]], callers: int, count: int, rounds: int,
            seconds: float, between_rounds: Callable[[], None] = lambda: None) -> list[Result]:
    """Alternate short slices between the servers, so the machine's drifts hit all of them alike.

    `targets`: name -> (address, serialized request, server pid or None); `between_rounds` runs after
    each round (the in-process ceilings, so that they are interleaved with the servers too).
    """
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    errors = dict.fromkeys(targets, 0)
    server_cpu = dict.fromkeys(targets, 0.0)
    client_cpu = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, (target, payload, pid) in targets.items():
            marks: list[tuple[float, float]] = []  # (server, client) CPU seconds as the window opens and closes
            values, failed = asyncio.run(drive(
                target, callers, payload, seconds, on_window=lambda: marks.append((cpu_seconds(pid), time.process_time()))))
            server_cpu[name] += marks[1][0] - marks[0][0]
            client_cpu[name] += marks[1][1] - marks[0][1]
            latencies[name] += values
            errors[name] += failed
        between_rounds()
    return [summarize(name, callers, count, values, errors[name], rounds * seconds, server_cpu[name],
                      client_cpu[name])
            for name, values in latencies.items()]


def in_process(model_path: Path, batch: np.ndarray, seconds: float, threads: int | None) -> float:
    """Images/s of onnxruntime alone on `batch`; threads None: onnxruntime's defaults (all cores, spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: to_model_input(batch)}
    for _ in range(20):
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def in_process_table(models: dict[str, Path], images: np.ndarray, seconds: float) -> dict[str, dict[str, float]]:
    """{model: {"batch 64, 2 threads": images/s, ...}} over the thread settings worth trying here."""
    cores = len(os.sched_getaffinity(0))
    settings = {"1 thread": 1, f"{cores} threads": cores, "ORT default": None}
    return {name: {f"batch {n}, {label}": in_process(path, images[:n], seconds, threads)
                   for n in (1, 64) for label, threads in settings.items()}
            for name, path in models.items()}


def interleaved_in_process_table(models: dict[str, Path], images: np.ndarray, seconds: float, rounds: int):
    """in_process_table measured in `rounds` slices; returns (one slice's measurement, the averaged table)."""
    slices: list[dict[str, dict[str, float]]] = []

    def measure_slice() -> None:
        slices.append(in_process_table(models, images, seconds / rounds))

    def averaged() -> dict[str, dict[str, float]]:
        return {model: {label: statistics.fmean(s[model][label] for s in slices) for label in slices[0][model]}
                for model in slices[0]}

    return measure_slice, averaged


def best(table: dict[str, float], batch: int) -> tuple[str, float]:
    return max(((label, value) for label, value in table.items() if label.startswith(f"batch {batch},")),
               key=lambda item: item[1])


def report(results: list[Result], ceilings: dict[str, dict[str, float]], header: str) -> list[str]:
    by = {(r.target, r.callers, r.images_per_call): r for r in results}
    lines = [header]
    for model, table in ceilings.items():
        lines.append(f"in-process onnxruntime, {model}: " + "; ".join(f"{k} {v:,.0f}/s" for k, v in table.items()))
    columns = (f"{'scenario':<9}{'server':<13}{'req/s':>9}{'images/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}"
               f"{'CPU ms/call':>12}{'(client)':>9}  vs naive")
    lines += [columns, "-" * (len(columns) + 20)]
    for callers, count in SCENARIOS:
        naive = by[(NAIVE, callers, count)]
        for target in (SERVE, SERVE_INT8, NAIVE, CANNED):
            r = by.get((target, callers, count))
            if r is None:
                continue
            ratio = (naive.p50_ms / r.p50_ms) if callers == 1 else (r.images_per_s / naive.images_per_s)
            what = "p50 speed-up" if callers == 1 else "throughput"
            lines.append(f"{f'{callers} x {count}':<9}{r.target:<13}{r.requests_per_s:>9,.0f}{r.images_per_s:>10,.0f}"
                         f"{r.p50_ms:>8.3f}{r.p99_ms:>8.3f}{r.errors:>7}{r.server_cpu_ms_per_call:>12.3f}"
                         f"{r.client_cpu_ms_per_call:>9.3f}  {ratio:.2f}x ({what})")
    serve32, naive32, canned32 = (by[(t, 32, 1)] for t in (SERVE, NAIVE, CANNED))
    serve64 = by[(SERVE, 8, 64)]
    best_label, best64 = best(ceilings["fp32"], 64)
    gap = by[(SERVE, 1, 1)].p50_ms - by[(CANNED, 1, 1)].p50_ms
    errors = sum(r.errors for r in results)
    check = lambda ok: "met" if ok else "NOT met"  # noqa: E731

    def bound(callers: int, count: int) -> float:
        """Calls/s of a server that added nothing to the canned server's per-call CPU but the model's own:
        canned's rate scaled by its CPU per call (server + load generator) over that plus the model's
        (in-process, one thread, so CPU time = wall time; batches of the call's size)."""
        canned = by[(CANNED, callers, count)]
        rpc_ms = canned.server_cpu_ms_per_call + canned.client_cpu_ms_per_call
        model_ms = 1000 * count / ceilings["fp32"][f"batch {1 if count == 1 else 64}, 1 thread"]
        return canned.requests_per_s * rpc_ms / (rpc_ms + model_ms)

    lines += [
        "goals (mnist-serve, FP32):",
        f"  32 x 1: {serve32.requests_per_s / naive32.requests_per_s:.2f}x naive (goal {GOAL_32X1_VS_NAIVE}x), "
        f"{serve32.requests_per_s / canned32.requests_per_s:.2f}x canned (goal {GOAL_32X1_VS_CANNED}x): "
        f"{check(serve32.requests_per_s >= GOAL_32X1_VS_NAIVE * naive32.requests_per_s and serve32.requests_per_s >= GOAL_32X1_VS_CANNED * canned32.requests_per_s)}",
        f"    bound for any server on this gRPC stack (canned + the model's CPU per call): "
        f"{bound(32, 1):,.0f} calls/s = {bound(32, 1) / canned32.requests_per_s:.2f}x canned",
        f"  8 x 64: {serve64.images_per_s / best64:.2f}x in-process at its best ({best_label}, {best64:,.0f}/s; "
        f"goal {GOAL_8X64_VS_IN_PROCESS}x): {check(serve64.images_per_s >= GOAL_8X64_VS_IN_PROCESS * best64)}",
        f"    bound for any server on this gRPC stack: {64 * bound(8, 64):,.0f} images/s = "
        f"{64 * bound(8, 64) / best64:.2f}x in-process at its best",
        f"  1 x 1 p50: canned + {gap:.3f} ms (goal + {GOAL_1X1_P50_OVER_CANNED_MS} ms): "
        f"{check(gap <= GOAL_1X1_P50_OVER_CANNED_MS)}; the model alone takes "
        f"{1000 / ceilings['fp32']['batch 1, 1 thread']:.3f} ms (in-process, 1 thread, hot)",
        f"  errors: {errors}: {check(errors == 0)}",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--model-version", type=int, help="default: the newest")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per scenario and server")
    parser.add_argument("--rounds", type=int, default=6,
                        help="slices the seconds are cut into, alternating between the servers")
    parser.add_argument("--in-process-seconds", type=float, default=1.5,
                        help="seconds per in-process measurement (model x batch x thread setting), in --rounds "
                             "slices interleaved with the 8 x 64 scenario")
    parser.add_argument("--server-args", default="", help="extra mnist-serve flags, e.g. '--workers 1'")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="leave the INT8 model out")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    repository = Path(args.model_repository)
    try:
        fp32 = load_version(repository, args.model_name, args.model_version)
        int8 = load_version(repository, f"{args.model_name}_int8") if args.int8 else None
    except RepositoryError as err:
        if args.int8 and "fp32" in locals():
            print(f"bench: no INT8 model ({err}); measuring FP32 only", file=sys.stderr)
            int8 = None
        else:
            print(f"bench: error: {err}", file=sys.stderr)
            return 1
    images = load_idx_dir(find_data_dir("mnist") or ROOT.parent / "shared/datasets/mnist").test_images
    server_args = args.server_args.split()

    results: list[Result] = []
    with ExitStack() as stack:
        targets: dict[str, tuple[str, int]] = {}  # name -> (address, pid)
        for name, module, extra in ((CANNED, "bench.canned_server", []),
                                    (NAIVE, "bench.naive_server", ["--model", str(fp32.model_path)])):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *extra], cwd=ROOT)
            stack.callback(lambda p=proc: (p.terminate(), p.wait()))
            wait_until_serving(f"127.0.0.1:{port}", 30, proc)
            targets[name] = (f"127.0.0.1:{port}", proc.pid)
        serve = stack.enter_context(start_server(repository, *QUIET_PORTS, "--model-name", fp32.name,
                                                 "--model-version", str(fp32.version), *server_args))
        targets[SERVE] = (serve.target, serve.proc.pid)
        if int8 is not None:
            serve_int8 = stack.enter_context(start_server(
                repository, *QUIET_PORTS, "--model-name", int8.name, *server_args))
            targets[SERVE_INT8] = (serve_int8.target, serve_int8.proc.pid)
        model_of = {SERVE_INT8: int8.name if int8 else ""}
        # The model's ceiling is measured between the rounds of the largest scenario, interleaved with it.
        measure_slice, ceilings_measured = interleaved_in_process_table(
            {"fp32": fp32.model_path, **({"int8": int8.model_path} if int8 else {})}, images,
            args.in_process_seconds, args.rounds)
        for callers, count in SCENARIOS:
            payloads = {name: (target, infer_payload(images[:count], model_of.get(name, fp32.name)), pid)
                        for name, (target, pid) in targets.items()}
            results += compare(payloads, callers, count, args.rounds, args.seconds / args.rounds,
                               measure_slice if count == max(c for _, c in SCENARIOS) else lambda: None)
    ceilings = ceilings_measured()

    header = (f"model {fp32.name} v{fp32.version}{' and ' + int8.name + ' v' + str(int8.version) if int8 else ''}; "
              f"{len(os.sched_getaffinity(0))} cores; {args.seconds:g} s per scenario and server in {args.rounds} "
              f"alternating slices; mnist-serve flags: {args.server_args or 'defaults'}")
    print("\n".join(report(results, ceilings, header)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "in_process": ceilings,
                                         "server_args": args.server_args}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
