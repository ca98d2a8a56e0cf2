"""Throughput and latency of mnist-serve over loopback, as its users see it, beside a naive server
and two ceilings, in one run.

Scenarios (callers x images per call, connections): 1x1; 32x1 and 8x64 each from ONE connection
(gRPC's recommended single channel: with SO_REUSEPORT the kernel gives it to one worker) and from 8
(a local subchannel pool: 8 TCP connections, callers spread round-robin). All are KServe v2
ModelInfer FP32 calls (raw_input_contents). Each runs, in alternating slices, against
  - mnist-serve with the FP32 model (and `--variant NAME='FLAGS'`: more mnist-serve configurations
    in the same run, for A/B measurements),
  - mnist-serve with the INT8 model (`<model>_int8`, when the repository has it),
  - the naive baseline (bench/naive_server.py): synchronous gRPC, 16 threads, session.run per call,
    onnxruntime's default threads, no batching. Every figure is reported as a ratio to it;
  - a canned server: the same gRPC stack answering without any model (the RPC ceiling).
The model's own ceiling is onnxruntime called in-process on the same batches, at several thread
settings, measured between the rounds of the 8 x 64 scenarios (the best is the goal's reference).
The load generator (bench/common.py) is this process, so on a small machine it competes with the
servers for the cores: read ratios, not absolutes. Each server's CPU time (its processes, workers,
all threads) over its slices is printed per call, beside the load generator's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    ROOT,
    Sample,
    cpu_seconds,
    measure,
    merge,
    percentile_ms,
    table,
    test_images,
    usable_cores,
)
from core.contract import IMAGE_SHAPE, INPUT_NAME, to_model_input
from core.repository import RepositoryError, load_version
from serving.process import free_port, start_server, wait_until_serving


@dataclass(frozen=True)
class Scenario:
    callers: int
    images: int  # per call
    connections: int

    @property
    def label(self) -> str:
        return f"{self.callers} x {self.images}, {self.connections} conn"


SCENARIOS = (
    Scenario(1, 1, 1),
    Scenario(32, 1, 1),
    Scenario(32, 1, 8),
    Scenario(8, 64, 1),
    Scenario(8, 64, 8),
)
# only gRPC is measured; several servers run at once
QUIET_PORTS = ("--metrics-port", "0", "--http-port", "0")
NAIVE, CANNED, SERVE, SERVE_INT8 = "naive", "canned", "mnist-serve", "serve-int8"

# The goals of issue 19, checked on every run.
GOAL_VS_NAIVE = 1.3  # 32 x 1 and 8 x 64, from one connection and from 8
GOAL_8X64_VS_IN_PROCESS = 0.8


@dataclass
class Result:
    target: str
    callers: int
    images_per_call: int
    connections: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms_per_call: (
        float  # CPU time of the server's processes (all threads) per answered call
    )
    client_cpu_ms_per_call: (
        float  # the load generator's (this process's) CPU time per answered call
    )


def infer_payload(images: np.ndarray, model_name: str) -> bytes:
    """One serialized ModelInfer request: FP32 [n, 28, 28, 1] in raw_input_contents."""
    batch = to_model_input(images)
    # The message class from whichever file registered `inference.*` (tritonclient's or ours).
    from serving.client import _kserve_message_types

    request = _kserve_message_types()[0](model_name=model_name)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[len(batch), *IMAGE_SHAPE])
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request.SerializeToString()


def summarize(
    name: str,
    scenario: Scenario,
    sample: Sample,
    server_cpu: float = float("nan"),
    client_cpu: float = float("nan"),
) -> Result:
    calls = len(sample.latencies) or 1
    rps = sample.calls_per_s
    return Result(
        name,
        scenario.callers,
        scenario.images,
        scenario.connections,
        rps,
        rps * scenario.images,
        percentile_ms(sample.latencies, 50),
        percentile_ms(sample.latencies, 99),
        sample.errors,
        1000 * server_cpu / calls,
        1000 * client_cpu / calls,
    )


def compare(
    targets: dict[str, tuple[str, bytes, int | None]],
    scenario: Scenario,
    rounds: int,
    seconds: float,
    between_rounds: Callable[[], None] = lambda: None,
) -> list[Result]:
    """Alternate short slices between the servers, so the machine's drifts hit all of them alike.

    `targets`: name -> (address, serialized request, server pid or None); `between_rounds` runs
    after each round (the in-process ceilings, so that they are interleaved with the servers too).
    """
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    server_cpu = dict.fromkeys(targets, 0.0)
    client_cpu = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, (target, payload, pid) in targets.items():
            marks: list[
                tuple[float, float]
            ] = []  # (server, client) CPU s as the window opens, closes
            samples[name].append(
                measure(
                    target,
                    payload,
                    callers=scenario.callers,
                    connections=scenario.connections,
                    seconds=seconds,
                    on_window=lambda pid=pid: marks.append((cpu_seconds(pid), time.process_time())),
                )
            )
            server_cpu[name] += marks[1][0] - marks[0][0]
            client_cpu[name] += marks[1][1] - marks[0][1]
        between_rounds()
    return [
        summarize(name, scenario, merge(parts), server_cpu[name], client_cpu[name])
        for name, parts in samples.items()
    ]


def in_process(model_path: Path, batch: np.ndarray, seconds: float, threads: int | None) -> float:
    """Images/s of onnxruntime alone on `batch`; threads None: its defaults (all cores, spin)."""
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


def in_process_table(
    models: dict[str, Path], images: np.ndarray, seconds: float
) -> dict[str, dict[str, float]]:
    """{model: {"batch 64, 2 threads": images/s, ...}} over the thread settings worth trying."""
    cores = usable_cores()
    settings = {"1 thread": 1, f"{cores} threads": cores, "ORT default": None}
    return {
        name: {
            f"batch {n}, {label}": in_process(path, images[:n], seconds, threads)
            for n in (1, 64)
            for label, threads in settings.items()
        }
        for name, path in models.items()
    }


def interleaved_in_process_table(
    models: dict[str, Path], images: np.ndarray, seconds: float, rounds: int
):
    """in_process_table in `rounds` slices; returns (measure one slice, the averaged table)."""
    slices: list[dict[str, dict[str, float]]] = []

    def measure_slice() -> None:
        slices.append(in_process_table(models, images, seconds / rounds))

    def averaged() -> dict[str, dict[str, float]]:
        return {
            model: {
                label: statistics.fmean(s[model][label] for s in slices)
                for label in slices[0][model]
            }
            for model in slices[0]
        }

    return measure_slice, averaged


def best(table_: dict[str, float], batch: int) -> tuple[str, float]:
    return max(
        ((label, value) for label, value in table_.items() if label.startswith(f"batch {batch},")),
        key=lambda item: item[1],
    )


COLUMNS = (
    ("scenario", ""),
    ("server", ""),
    ("calls/s", ",.0f"),
    ("images/s", ",.0f"),
    ("p50 ms", ".3f"),
    ("p99 ms", ".3f"),
    ("errors", "d"),
    ("CPU ms/call", ".3f"),
    ("(client)", ".3f"),
    ("vs naive", ""),
)


def _row(r: Result, naive: Result, scenario: Scenario) -> dict[str, object]:
    lone = scenario.callers == 1
    ratio = naive.p50_ms / r.p50_ms if lone else r.images_per_s / naive.images_per_s
    return {
        "scenario": scenario.label,
        "server": r.target,
        "calls/s": r.requests_per_s,
        "images/s": r.images_per_s,
        "p50 ms": r.p50_ms,
        "p99 ms": r.p99_ms,
        "errors": r.errors,
        "CPU ms/call": r.server_cpu_ms_per_call,
        "(client)": r.client_cpu_ms_per_call,
        "vs naive": f"{ratio:.2f}x ({'p50 speed-up' if lone else 'throughput'})",
    }


def report(
    results: list[Result], ceilings: dict[str, dict[str, float]], header: str, order: list[str]
) -> list[str]:
    by = {(r.target, Scenario(r.callers, r.images_per_call, r.connections)): r for r in results}
    lines = [header]
    for model, ceiling in ceilings.items():
        lines.append(
            f"in-process onnxruntime, {model}: "
            + "; ".join(f"{k} {v:,.0f}/s" for k, v in ceiling.items())
        )
    rows = [
        _row(by[(target, s)], by[(NAIVE, s)], s)
        for s in SCENARIOS
        for target in order
        if (target, s) in by
    ]
    lines.append(table(rows, COLUMNS))
    return lines + goals(by, ceilings)


def goals(by: dict, ceilings: dict[str, dict[str, float]]) -> list[str]:
    """The issue's goals for mnist-serve (FP32, its defaults), each with what bounds it here."""
    check = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    best_label, best64 = best(ceilings["fp32"], 64)

    def bound(s: Scenario) -> float:
        """Calls/s of a server that added nothing to the canned server's per-call CPU but the
        model's own: canned's rate scaled by its CPU per call (server + load generator) over that
        plus the model's (in-process, one thread, so CPU time = wall time)."""
        canned = by[(CANNED, s)]
        rpc_ms = canned.server_cpu_ms_per_call + canned.client_cpu_ms_per_call
        model_ms = (
            1000 * s.images / ceilings["fp32"][f"batch {1 if s.images == 1 else 64}, 1 thread"]
        )
        return canned.requests_per_s * rpc_ms / (rpc_ms + model_ms)

    lines = ["goals (mnist-serve, FP32):"]
    for s in SCENARIOS[1:]:
        serve, naive = by[(SERVE, s)], by[(NAIVE, s)]
        ratio = serve.images_per_s / naive.images_per_s
        lines.append(
            f"  {s.label}: {ratio:.2f}x naive (goal {GOAL_VS_NAIVE}x): "
            f"{check(ratio >= GOAL_VS_NAIVE)}; bound for any server on this gRPC stack "
            f"(canned + the model's CPU per call): {bound(s) * s.images:,.0f} images/s = "
            f"{bound(s) * s.images / naive.images_per_s:.2f}x naive"
        )
        if s.images == 64:
            lines.append(
                f"    {serve.images_per_s / best64:.2f}x in-process at its best ({best_label},"
                f" {best64:,.0f}/s; goal {GOAL_8X64_VS_IN_PROCESS}x): "
                f"{check(serve.images_per_s >= GOAL_8X64_VS_IN_PROCESS * best64)}"
            )
    lone = SCENARIOS[0]
    serve, naive, canned = (by[(t, lone)] for t in (SERVE, NAIVE, CANNED))
    lines.append(
        f"  1 x 1 p50: {serve.p50_ms:.3f} ms, naive {naive.p50_ms:.3f} ms (goal: <= naive): "
        f"{check(serve.p50_ms <= naive.p50_ms)}; canned {canned.p50_ms:.3f} ms, the model "
        f"alone {1000 / ceilings['fp32']['batch 1, 1 thread']:.3f} ms (in-process, hot)"
    )
    errors = sum(r.errors for (target, _), r in by.items() if target == SERVE)
    lines.append(f"  errors: {errors}: {check(errors == 0)}")
    return lines


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    variants = {}
    for text in texts:
        name, _, flags = text.partition("=")
        if not name or name in (NAIVE, CANNED, SERVE, SERVE_INT8):
            raise SystemExit(f"bench: error: --variant {text!r}: give NAME='FLAGS' with a new name")
        variants[name] = flags.split()
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--model-version", type=int, help="default: the newest")
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="measured seconds per scenario and server"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="slices the seconds are cut into, alternating between the servers",
    )
    parser.add_argument(
        "--in-process-seconds",
        type=float,
        default=1.5,
        help="seconds per in-process measurement (model x batch x thread setting), "
        "in --rounds slices interleaved with the 8 x 64 scenarios",
    )
    parser.add_argument(
        "--server-args", default="", help="extra mnist-serve flags, e.g. '--workers 1'"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="another mnist-serve (FP32) with these flags in the same run, e.g. "
        "--variant 'one-thread=--intra-op-threads 1' (repeatable)",
    )
    parser.add_argument(
        "--no-int8", dest="int8", action="store_false", help="leave the INT8 model out"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variant)

    repository = Path(args.model_repository)
    try:
        fp32 = load_version(repository, args.model_name, args.model_version)
    except RepositoryError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    int8 = None
    if args.int8:
        try:
            int8 = load_version(repository, f"{args.model_name}_int8")
        except RepositoryError as err:
            print(f"bench: no INT8 model ({err}); measuring FP32 only", file=sys.stderr)
    images = test_images()
    server_args = args.server_args.split()
    load = os.getloadavg()[0]  # printed with the figures: on a shared machine they depend on it

    results: list[Result] = []
    with ExitStack() as stack:
        targets: dict[str, tuple[str, int]] = {}  # name -> (address, pid)
        for name, module, extra in (
            (CANNED, "bench.canned_server", []),
            (NAIVE, "bench.naive_server", ["--model", str(fp32.model_path)]),
        ):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "--port", str(port), *extra], cwd=ROOT
            )
            stack.callback(lambda p=proc: (p.terminate(), p.wait()))
            wait_until_serving(f"127.0.0.1:{port}", 30, proc)
            targets[name] = (f"127.0.0.1:{port}", proc.pid)
        model_of = {}
        for name, flags in {SERVE: server_args, **variants}.items():
            serve = stack.enter_context(
                start_server(
                    repository,
                    *QUIET_PORTS,
                    "--model-name",
                    fp32.name,
                    "--model-version",
                    str(fp32.version),
                    *flags,
                )
            )
            targets[name] = (serve.target, serve.proc.pid)
        if int8 is not None:
            serve_int8 = stack.enter_context(
                start_server(repository, *QUIET_PORTS, "--model-name", int8.name, *server_args)
            )
            targets[SERVE_INT8] = (serve_int8.target, serve_int8.proc.pid)
            model_of[SERVE_INT8] = int8.name
        measure_slice, ceilings_measured = interleaved_in_process_table(
            {"fp32": fp32.model_path, **({"int8": int8.model_path} if int8 else {})},
            images,
            args.in_process_seconds,
            2 * args.rounds,
        )
        for scenario in SCENARIOS:
            payloads = {
                name: (
                    target,
                    infer_payload(images[: scenario.images], model_of.get(name, fp32.name)),
                    pid,
                )
                for name, (target, pid) in targets.items()
            }
            results += compare(
                payloads,
                scenario,
                args.rounds,
                args.seconds / args.rounds,
                measure_slice if scenario.images == 64 else lambda: None,
            )
    ceilings = ceilings_measured()

    header = (
        f"model {fp32.name} v{fp32.version}"
        f"{' and ' + int8.name + ' v' + str(int8.version) if int8 else ''}; "
        f"{usable_cores()} cores, load average {load:.1f} at the start; {args.seconds:g} s per "
        f"scenario and server in {args.rounds} "
        f"alternating slices; mnist-serve flags: {args.server_args or 'defaults'}"
        + "".join(f"; {name}: {' '.join(flags)}" for name, flags in variants.items())
    )
    order = [SERVE, *variants, SERVE_INT8, NAIVE, CANNED]
    print("\n".join(report(results, ceilings, header, order)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "in_process": ceilings,
                    "server_args": args.server_args,
                    "variants": variants,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
