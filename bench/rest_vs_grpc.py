"""KServe v2 over REST against KServe v2 over gRPC: the same server process, model and batcher, in one run.

Scenarios (callers x images per call): 1x1, 32x1, 8x64. Each runs, in alternating slices, as
  - gRPC ModelInfer, FP32 in raw_input_contents (what tritonclient.grpc sends),
  - REST infer with Triton's binary tensor data: FP32 bytes after the JSON header, probabilities back
    as binary (what tritonclient.http sends by default),
  - REST infer with JSON: UINT8 `data` lists in, probabilities as JSON `data` out (curl's way).
The load generator is this process (grpc.aio and aiohttp, one connection per caller, requests
serialized once up front); on a small machine it shares the cores with the server: compare rows.

    python -m bench.rest_vs_grpc --model-repository model_repository --seconds 2 --rounds 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import numpy as np

from bench.bench_serving import Scenario, infer_payload, summarize
from bench.common import Sample, closed_loop, merge, test_images
from core.contract import IMAGE_SHAPE, INPUT_NAME, to_model_input
from serving.process import start_server

SCENARIOS = ((1, 1), (32, 1), (8, 64))


def rest_binary_payload(images: np.ndarray, model: str) -> tuple[bytes, dict[str, str]]:
    raw = to_model_input(images).astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [len(images), *IMAGE_SHAPE],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def rest_json_payload(images: np.ndarray, model: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [len(images), *IMAGE_SHAPE],
                                   "data": images.ravel().tolist()}]}).encode()
    return body, {"Content-Type": "application/json"}


async def drive_rest(url: str, callers: int, payload: tuple[bytes, dict[str, str]], seconds: float,
                     warmup: float = 0.3) -> Sample:
    """`callers` coroutines, each on its own keep-alive connection, back-to-back calls."""
    body, headers = payload
    latencies: list[float] = []
    errors = 0
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(callers)]

    async def call(session: aiohttp.ClientSession) -> bool:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status == 200

    try:
        await asyncio.gather(*(call(session) for session in sessions))
        measuring_from = time.perf_counter() + warmup
        until = measuring_from + seconds

        async def caller(session):
            nonlocal errors
            while (now := time.perf_counter()) < until:
                if not await call(session):
                    errors += 1
                    continue
                if now >= measuring_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller(session) for session in sessions))
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    return Sample(tuple(latencies), errors, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one slice")
    parser.add_argument("--rounds", type=int, default=4, help="slices per scenario and transport")
    args = parser.parse_args()
    images = test_images()
    with start_server(args.model_repository, "--model-name", args.model_name, "--metrics-port", "0") as server:
        url = f"http://127.0.0.1:{server.http_port}/v2/models/{args.model_name}/infer"
        print(f"{'scenario':<8} {'transport':<22} {'calls/s':>8} {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} errors")
        for callers, count in SCENARIOS:
            batch = images[:count]
            drivers = {
                "gRPC (raw FP32)": lambda s, p=infer_payload(batch, args.model_name): closed_loop(
                    server.target, p, callers=callers, connections=callers, seconds=s),
                "REST (binary FP32)": lambda s, p=rest_binary_payload(batch, args.model_name): drive_rest(url, callers, p, s),
                "REST (JSON UINT8)": lambda s, p=rest_json_payload(batch, args.model_name): drive_rest(url, callers, p, s),
            }
            samples: dict[str, list[Sample]] = {name: [] for name in drivers}
            for _ in range(args.rounds):
                for name, run in drivers.items():
                    samples[name].append(asyncio.run(run(args.seconds)))
            for name, parts in samples.items():
                r = summarize(name, Scenario(callers, count, callers), merge(parts))
                print(f"{callers:>2} x {count:<3}  {name:<22} {r.requests_per_s:>8,.0f} {r.images_per_s:>9,.0f} "
                      f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
