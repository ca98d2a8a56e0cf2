"""What tracing costs: mnist-serve at 32 callers x 1 image, tracing off and on at three samplers,
in one run, in alternating slices so that the machine's drifts hit every server alike.

    python -m bench.tracing_cost [--model-repository model_repository] [--rounds 3] [--seconds 3]

Servers (each --workers 1 unless told otherwise, same flags otherwise):
  off         no tracing (the default): every stage pays one branch on a module flag
  off again   a second, identical server: the spread between the two is this run's noise
  sampler 0   --trace-mode opentelemetry --trace-sample-ratio 0: every call pays the server span's
              sampling decision, nothing is recorded
  1 %         --trace-sample-ratio 0.01
  100 %       --trace-sample-ratio 1: every call recorded (server, decode, queue, batch,
              onnxruntime.run spans) and exported by OTLP/gRPC to a receiver in this process
The traced servers export to a real OTLP receiver (bench/otlp_sink.py), so the export's cost is in
the figures. Printed beside each: the share of its calls that were traced (server spans over the
calls measured, which leave out each slice's warm-up: a little over the true share) and the spans
per traced call (fewer than five where calls shared a batch). The load generator is this process
too: on a small machine read the ratios to `off`, not the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from bench.common import table, test_images
from bench.otlp_sink import OtlpReceiver
from bench.serving_scenarios import QUIET_PORTS, Result, Scenario, compare, infer_payload
from core.repository import RepositoryError, load_version
from serving.process import start_server

SAMPLERS = {"sampler 0": "0", "1 %": "0.01", "100 %": "1"}


COLUMNS = (
    ("server", ""),
    ("calls/s", ".0f"),
    ("vs off", ".3f"),
    ("p50 ms", ".2f"),
    ("p99 ms", ".2f"),
    ("server CPU ms/call", ".3f"),
    ("traced share", ".3f"),
    ("spans/traced call", ".2f"),
    ("errors", "d"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--images", type=int, default=1, help="images per call")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="--workers of every server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per server per round")
    return parser.parse_args(argv)


def start_servers(stack: ExitStack, args: argparse.Namespace, endpoint: str) -> dict:
    """{name: server}: two without tracing, then one per sampler exporting to `endpoint`."""
    repository = Path(args.model_repository)
    flags = (*QUIET_PORTS, "--model-name", args.model_name, "--workers", str(args.workers))
    servers = {
        name: stack.enter_context(
            start_server(repository, *flags, env={"OTEL_TRACES_EXPORTER": "none"})
        )
        for name in ("off", "off again")
    }
    for name, ratio in SAMPLERS.items():
        tracing = ("--trace-mode", "opentelemetry", "--trace-endpoint", endpoint)
        servers[name] = stack.enter_context(
            start_server(repository, *flags, *tracing, "--trace-sample-ratio", ratio)
        )
    return servers


def rows_of(results: list[Result], pids: dict[str, int], spans, calls_traced, args) -> list[dict]:
    """One table row per server: its figures, the ratio to `off`, what its traces held."""
    off = next(r for r in results if r.target == "off")
    rows = []
    for result in results:
        pid = pids[result.target]
        calls = result.requests_per_s * args.seconds * args.rounds
        nan = float("nan")
        rows.append(
            {
                "server": result.target,
                "calls/s": result.requests_per_s,
                "vs off": result.requests_per_s / off.requests_per_s if off.requests_per_s else nan,
                "p50 ms": result.p50_ms,
                "p99 ms": result.p99_ms,
                "server CPU ms/call": result.server_cpu_ms_per_call,
                "errors": result.errors,
                "traced share": calls_traced[pid] / calls if calls else nan,
                "spans/traced call": spans[pid] / calls_traced[pid] if calls_traced[pid] else nan,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load_version(Path(args.model_repository), args.model_name)
    except RepositoryError as err:
        print(f"bench.tracing_cost: error: {err}", file=sys.stderr)
        return 1
    payload = infer_payload(test_images()[: args.images], args.model_name)
    scenario = Scenario(args.callers, args.images, args.connections)
    with ExitStack() as stack:
        receiver = stack.enter_context(OtlpReceiver())
        servers = start_servers(stack, args, receiver.endpoint)
        targets = {
            name: (server.target, payload, server.proc.pid) for name, server in servers.items()
        }
        print(
            f"{scenario.label}, {args.rounds} rounds x {args.seconds:g} s per server, --workers "
            f"{args.workers}; OTLP receiver on {receiver.endpoint}",
            flush=True,
        )
        results = compare(targets, scenario, args.rounds, args.seconds)
        for server in servers.values():
            server.stop()  # each exporter's shutdown sends what it still held
        received = receiver.spans()
    spans = Counter(span.resource.get("process.pid") for span in received)
    calls_traced = Counter(span.resource.get("process.pid") for span in received if span.kind == 2)
    pids = {name: server.proc.pid for name, server in servers.items()}
    print(table(rows_of(results, pids, spans, calls_traced, args), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
