"""An independent load generator: NVIDIA's tritonclient.grpc.aio, as a Triton user's client calls.

`make bench ARGS="--generator tritonclient"` runs every slice through it, so that the figures do not
rest on the project's own generator (bench/common.py sends pre-serialized bytes; tritonclient builds
each request from an InferInput, as users' code does, and so spends more CPU per call on the same
cores). It runs as its own process: tritonclient's proto files and mnist-serve's define the same
`inference.*` messages, which one Python process cannot hold twice.

    python -m bench.tritonclient_generator 127.0.0.1:8001 --payload request.bin --callers 8 \
        --connections 1 --seconds 5

`--payload` is one serialized KServe v2 ModelInferRequest (raw_input_contents), sent as an InferInput
with the same name, datatype, shape and bytes. It prints `window-open` and `window-close` as the
measured window opens and closes (so a caller can read the server's CPU counters then), then one
JSON line: the latencies of the calls completed in the window, the errors, and its own CPU time
over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import tritonclient.grpc.aio as triton  # before anything could import mnist-serve's protos
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.utils import InferenceServerException

DTYPES = {"FP32": "<f4", "UINT8": "u1"}
MAX_MESSAGE = 2**31 - 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("--payload", required=True, help="a serialized ModelInferRequest")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def request_inputs(payload: bytes) -> tuple[str, list[InferInput]]:
    """The model name and the InferInputs that rebuild this serialized request."""
    request = service_pb2.ModelInferRequest.FromString(payload)
    inputs = []
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        data = np.frombuffer(raw, dtype=DTYPES[tensor.datatype]).reshape(tuple(tensor.shape))
        infer_input = InferInput(tensor.name, list(tensor.shape), tensor.datatype)
        infer_input.set_data_from_numpy(data)
        inputs.append(infer_input)
    return request.model_name, inputs


def client(target: str, own_connection: bool) -> triton.InferenceServerClient:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    if own_connection:  # else gRPC shares one TCP connection between the clients
        options.append(("grpc.use_local_subchannel_pool", 1))
    return triton.InferenceServerClient(target, channel_args=options)


async def closed_loop(args: argparse.Namespace, model: str, inputs: list[InferInput]) -> dict:
    count = max(1, min(args.callers, args.connections))
    clients = [client(args.target, count > 1) for _ in range(count)]
    latencies: list[float] = []
    errors = 0
    try:
        for each in clients:  # connect every channel before the clock starts
            try:
                await each.infer(model, inputs, client_timeout=args.timeout)
            except InferenceServerException:
                errors += 1
        opens = time.perf_counter() + args.warmup
        closes = opens + args.seconds
        cpu = []

        def mark() -> None:
            cpu.append(time.process_time())
            print("window-open" if len(cpu) == 1 else "window-close", flush=True)

        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + args.warmup, mark)

        async def caller(each: triton.InferenceServerClient) -> None:
            nonlocal errors
            while (now := time.perf_counter()) < closes:
                try:
                    await each.infer(model, inputs, client_timeout=args.timeout)
                except InferenceServerException:
                    errors += 1
                    continue
                if now >= opens:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller(clients[k % count]) for k in range(args.callers)))
        mark()
    finally:
        await asyncio.gather(*(each.close() for each in clients))
    return {
        "latencies": latencies,
        "errors": errors,
        "seconds": args.seconds,
        "client_cpu_s": cpu[1] - cpu[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with open(args.payload, "rb") as file:
            model, inputs = request_inputs(file.read())
    except (OSError, ValueError, KeyError) as err:
        print(f"tritonclient_generator: error: --payload {args.payload}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(asyncio.run(closed_loop(args, model, inputs))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
