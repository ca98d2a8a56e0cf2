"""The simplest server on mnist-serve's own gRPC stack: the canned server's grpc.aio loop, options
and per-call metrics, with ModelInfer running the model inline, one call at a time.

Each call is the naive server's handler (bench/naive_server.py), awaited on the event loop, with a
one-thread onnxruntime session (as mnist-serve runs a lone image): no batching, no queue, no input
checks beyond the protocol's, no other workers. It is what a user could write in an afternoon on
grpc.aio, and so the bound that stack puts on mnist-serve at one image per call: `make bench`
prints mnist-serve beside it (the gap is the cost of mnist-serve's own layers) and beside the
naive synchronous server (the gap is grpc.aio's own).
"""

from __future__ import annotations

import argparse
import sys

import onnxruntime as ort

from bench.canned_server import main
from bench.naive_server import NaiveInference
from serving import event_loop
from serving.config import ServeConfig


class InlineInference(NaiveInference):
    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        super().__init__(model_path, options)

    async def ModelInfer(self, request, context):
        return super().ModelInfer(request, context)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the ONNX file")
    args = parser.parse_args()
    sys.setswitchinterval(ServeConfig().switch_interval_us / 1e6)  # as mnist-serve sets it
    event_loop.run(main(args.port, InlineInference(args.model)))
