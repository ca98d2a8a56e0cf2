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
  - a canned server: the same gRPC stack answering without any model (the RPC ceiling);
  - aio-inline (bench/inline_server.py): the same gRPC stack running the model inline per call,
    nothing else: what mnist-serve's own layers cost, and what grpc.aio itself costs against the
    naive synchronous server.
The model's own ceiling is onnxruntime called in-process on the same batches, at several thread
settings, measured between the rounds of the 8 x 64 scenarios (the best is the goal's reference).
The load generator (bench/common.py) is this process, or with `--generator tritonclient`
tritonclient.grpc.aio in its own (bench/tritonclient_generator.py); on a small machine it competes with the
servers for the cores: read ratios, not absolutes. Each server's CPU time (its processes, workers,
all threads) over its slices is printed per call, beside the load generator's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.common import (
    measure,
    measure_with_tritonclient,
    start_module_server,
    test_images,
    usable_cores,
)
from bench.in_process import interleaved_in_process_table
from bench.serving_report import report
from bench.serving_scenarios import (
    CANNED,
    INLINE,
    NAIVE,
    QUIET_PORTS,
    SCENARIOS,
    SERVE,
    SERVE_INT8,
    Result,
    compare,
    infer_payload,  # also imported from here by tests/test_bench.py
)
from core.repository import RepositoryError, load_version
from serving.process import start_server

__all__ = ["infer_payload", "main"]


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    variants = {}
    for text in texts:
        name, _, flags = text.partition("=")
        if not name or name in (NAIVE, CANNED, INLINE, SERVE, SERVE_INT8):
            raise SystemExit(f"bench: error: --variant {text!r}: give NAME='FLAGS' with a new name")
        variants[name] = flags.split()
    return variants


# --generator: who sends the calls (the figures must hold for any efficient load generator)
GENERATORS = {"bench": measure, "tritonclient": measure_with_tritonclient}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.key for s in SCENARIOS],
        help="measure only this scenario (callers x images / connections; repeatable): "
        "for quick A/B runs; default: all of them",
    )
    parser.add_argument(
        "--generator",
        choices=sorted(GENERATORS),
        default="bench",
        help="the load generator: bench (bench/common.py: pre-serialized bytes, the lightest "
        "client) or tritonclient (tritonclient.grpc.aio in its own process, as users' code calls: "
        "more client CPU per call on the same cores)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def load_models(args: argparse.Namespace):
    """(FP32, INT8 or None) from the repository; RepositoryError if there is no FP32 model."""
    repository = Path(args.model_repository)
    fp32 = load_version(repository, args.model_name, args.model_version)
    int8 = None
    if args.int8:
        try:
            int8 = load_version(repository, f"{args.model_name}_int8")
        except RepositoryError as err:
            print(f"bench: no INT8 model ({err}); measuring FP32 only", file=sys.stderr)
    return fp32, int8


def start_targets(
    stack: ExitStack, args: argparse.Namespace, fp32, int8, variants: dict[str, list[str]]
) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """Every server measured, stopped with `stack`: ({name: (address, pid)}, {name: its model}
    where that is not the FP32 one)."""
    repository = Path(args.model_repository)
    server_args = args.server_args.split()
    targets = {
        CANNED: start_module_server(stack, "bench.canned_server"),
        NAIVE: start_module_server(stack, "bench.naive_server", "--model", str(fp32.model_path)),
        INLINE: start_module_server(stack, "bench.inline_server", "--model", str(fp32.model_path)),
    }
    model_of = {}
    for name, flags in {SERVE: server_args, **variants}.items():
        fp32_flags = ("--model-name", fp32.name, "--model-version", str(fp32.version))
        serve = stack.enter_context(start_server(repository, *QUIET_PORTS, *fp32_flags, *flags))
        targets[name] = (serve.target, serve.proc.pid)
    if int8 is not None:
        serve_int8 = stack.enter_context(
            start_server(repository, *QUIET_PORTS, "--model-name", int8.name, *server_args)
        )
        targets[SERVE_INT8] = (serve_int8.target, serve_int8.proc.pid)
        model_of[SERVE_INT8] = int8.name
    return targets, model_of


def run_scenarios(args, fp32, int8, variants, images: np.ndarray):
    """Every scenario against every server, the in-process ceilings between the 8 x 64 rounds:
    (the results, the ceilings)."""
    results: list[Result] = []
    with ExitStack() as stack:
        targets, model_of = start_targets(stack, args, fp32, int8, variants)
        measure_slice, ceilings_measured = interleaved_in_process_table(
            {"fp32": fp32.model_path, **({"int8": int8.model_path} if int8 else {})},
            images,
            args.in_process_seconds,
            2 * args.rounds,
        )
        chosen = [s for s in SCENARIOS if not args.scenario or s.key in args.scenario]
        if not any(s.images == 64 for s in chosen):
            measure_slice()  # the report's model figures, measured once when no 8 x 64 runs
        for scenario in chosen:
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
                GENERATORS[args.generator],
            )
    return results, ceilings_measured()


def header_line(args, fp32, int8, variants: dict[str, list[str]], load: float) -> str:
    return (
        f"model {fp32.name} v{fp32.version}"
        f"{' and ' + int8.name + ' v' + str(int8.version) if int8 else ''}; "
        f"{usable_cores()} cores, load average {load:.1f} at the start; {args.seconds:g} s per "
        f"scenario and server in {args.rounds} "
        f"alternating slices; load generator: {args.generator}; "
        f"mnist-serve flags: {args.server_args or 'defaults'}"
        + "".join(f"; {name}: {' '.join(flags)}" for name, flags in variants.items())
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = parse_variants(args.variant)
    try:
        fp32, int8 = load_models(args)
    except RepositoryError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    images = test_images()
    load = os.getloadavg()[0]  # printed with the figures: on a shared machine they depend on it
    results, ceilings = run_scenarios(args, fp32, int8, variants, images)
    order = [SERVE, *variants, SERVE_INT8, NAIVE, INLINE, CANNED]
    print(
        "\n".join(report(results, ceilings, header_line(args, fp32, int8, variants, load), order))
    )
    if args.json:
        figures = {
            "results": [asdict(r) for r in results],
            "in_process": ceilings,
            "server_args": args.server_args,
            "variants": variants,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
