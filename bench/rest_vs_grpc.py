"""KServe v2 over REST against KServe v2 over gRPC: the same server, model and batcher, one run.

Scenarios (callers x images per call): 1x1, 32x1, 8x64. Each runs, in alternating slices, as
  - gRPC ModelInfer, FP32 in raw_input_contents (what tritonclient.grpc sends),
  - REST infer with Triton's binary tensor data: FP32 bytes after the JSON header, probabilities
    back as binary (what tritonclient.http sends by default),
  - REST infer with JSON: UINT8 `data` lists in, probabilities as JSON `data` out (curl's way),
  - and the naive REST server (bench/naive_server.py --http-port: aiohttp, session.run in each
    handler) with the binary calls: the REST goal's baseline (32 x 1 >= 1.3x).
The load generator is this process (grpc.aio and aiohttp, one connection per caller, requests
serialized once up front); on a small machine it shares the cores with the server: compare rows.

    python -m bench.rest_vs_grpc --model-repository model_repository --seconds 2 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

import numpy as np

from bench.common import (
    Sample,
    closed_loop,
    merge,
    rest_closed_loop,
    start_module_server,
    table,
    test_images,
)
from bench.serving_scenarios import Scenario, infer_payload, summarize
from core.contract import IMAGE_SHAPE, INPUT_NAME, to_model_input
from core.repository import load_version
from serving.process import free_port, start_server

SCENARIOS = ((1, 1), (32, 1), (8, 64))


def rest_binary_payload(images: np.ndarray, model: str) -> tuple[bytes, dict[str, str]]:
    raw = to_model_input(images).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "datatype": "FP32",
                    "shape": [len(images), *IMAGE_SHAPE],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def rest_json_payload(images: np.ndarray, model: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "datatype": "UINT8",
                    "shape": [len(images), *IMAGE_SHAPE],
                    "data": images.ravel().tolist(),
                }
            ]
        }
    ).encode()
    return body, {"Content-Type": "application/json"}


def drive_rest(
    url: str, callers: int, payload: tuple[bytes, dict[str, str]], seconds: float
) -> Awaitable[Sample]:
    """`callers` coroutines, each on its own keep-alive connection, back-to-back calls."""
    return rest_closed_loop(url, payload, callers=callers, seconds=seconds)


NAIVE_REST = "naive REST (binary FP32)"
GOAL_REST_VS_NAIVE = 1.3  # issue 19: REST at 32 x 1 against a naive aiohttp server


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one slice")
    parser.add_argument("--rounds", type=int, default=4, help="slices per scenario and transport")
    parser.add_argument("--server-args", default="", help="extra mnist-serve flags")
    return parser.parse_args()


def drivers(
    grpc_target: str, url: str, naive_url: str, batch: np.ndarray, callers: int, model: str
) -> dict[str, Callable[[float], Awaitable[Sample]]]:
    """{transport: one slice of `seconds` of its closed loop} for one scenario."""
    binary = rest_binary_payload(batch, model)
    grpc_payload, json_payload = infer_payload(batch, model), rest_json_payload(batch, model)
    return {
        "gRPC (raw FP32)": lambda s: closed_loop(
            grpc_target, grpc_payload, callers=callers, connections=callers, seconds=s
        ),
        "REST (binary FP32)": lambda s: drive_rest(url, callers, binary, s),
        "REST (JSON UINT8)": lambda s: drive_rest(url, callers, json_payload, s),
        NAIVE_REST: lambda s: drive_rest(naive_url, callers, binary, s),
    }


def scenario_rows(runs: dict, callers: int, count: int, rounds: int, seconds: float) -> list[dict]:
    """The transports in alternating slices, one table row each."""
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(asyncio.run(run(seconds)))
    rows = []
    for name, parts in samples.items():
        r = summarize(name, Scenario(callers, count, callers), merge(parts))
        rows.append(
            {
                "scenario": f"{callers} x {count}",
                "transport": name,
                "calls/s": r.requests_per_s,
                "images/s": r.images_per_s,
                "p50 ms": r.p50_ms,
                "p99 ms": r.p99_ms,
                "errors": r.errors,
            }
        )
    return rows


def goal_line(rows: list[dict]) -> str:
    serve, baseline = (
        next(r for r in rows if r["scenario"] == "32 x 1" and r["transport"] == t)
        for t in ("REST (binary FP32)", NAIVE_REST)
    )
    ratio = serve["calls/s"] / baseline["calls/s"] if baseline["calls/s"] else float("nan")
    return (
        f"goal: REST (binary) at 32 x 1 {ratio:.2f}x the naive aiohttp server (goal "
        f"{GOAL_REST_VS_NAIVE}x): {'met' if ratio >= GOAL_REST_VS_NAIVE else 'NOT met'}"
    )


def main() -> int:
    args = parse_args()
    images = test_images()
    model = load_version(args.model_repository, args.model_name)
    with ExitStack() as stack:
        server = stack.enter_context(
            start_server(
                args.model_repository,
                "--model-name",
                args.model_name,
                "--metrics-port",
                "0",
                *args.server_args.split(),
            )
        )
        naive_http = free_port()
        start_module_server(
            stack,
            "bench.naive_server",
            "--model",
            str(model.model_path),
            "--http-port",
            str(naive_http),
        )
        url = f"http://127.0.0.1:{server.http_port}/v2/models/{args.model_name}/infer"
        naive_url = f"http://127.0.0.1:{naive_http}/v2/models/{args.model_name}/infer"
        rows = []
        for callers, count in SCENARIOS:
            runs = drivers(server.target, url, naive_url, images[:count], callers, args.model_name)
            rows += scenario_rows(runs, callers, count, args.rounds, args.seconds)
        print(table(rows, COLUMNS))
        print(goal_line(rows))
    return 0


COLUMNS = (
    ("scenario", ""),
    ("transport", ""),
    ("calls/s", ",.0f"),
    ("images/s", ",.0f"),
    ("p50 ms", ".2f"),
    ("p99 ms", ".2f"),
    ("errors", "d"),
)


if __name__ == "__main__":
    raise SystemExit(main())
