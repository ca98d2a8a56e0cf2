"""The simplest server on mnist-serve's own gRPC stack: the canned server's grpc.aio loop, options
and per-call metrics, with ModelInfer running the model inline, one call at a time.

Each FP32 raw-bytes call is one `session.run` on the event loop (onnxruntime, one intra-op thread,
as mnist-serve runs a lone image): no batching, no queue, no input checks beyond the protocol's,
no other workers. It is what a user could write in an afternoon on grpc.aio, and so the bound that
stack puts on mnist-serve at one image per call: `make bench` prints mnist-serve beside it (the
gap is the cost of mnist-serve's own layers) and beside the naive synchronous server (the gap is
grpc.aio's own).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.canned_server import main
from core.contract import INPUT_NAME, OUTPUT_DATATYPE, OUTPUT_NAME
from serving import event_loop
from serving.config import ServeConfig
from serving.generated import grpc_predict_v2_pb2 as kserve_pb
from serving.generated import grpc_predict_v2_pb2_grpc as kserve_grpc


class InlineInference(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    async def ModelInfer(self, request, context):
        tensor = request.inputs[0]
        images = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(tensor.shape)
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        response = kserve_pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        response.outputs.add(
            name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=list(probabilities.shape)
        )
        response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
        return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the ONNX file")
    args = parser.parse_args()
    sys.setswitchinterval(ServeConfig().switch_interval_us / 1e6)  # as mnist-serve sets it
    event_loop.run(main(args.port, InlineInference(args.model)))
