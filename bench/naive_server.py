"""The naive baseline: what a simple, unbatched server does with the same model and the same call.

A synchronous grpc.server with a 16-thread pool; each KServe v2 ModelInfer call runs
`session.run` on its own images at once, with onnxruntime's default threading and no batching.
`make bench` reports every scenario as a ratio to this server, measured in the same run:
the product's batching must beat what these few lines already do. With `--http-port`, the same
process also serves KServe v2 REST the naive way (aiohttp, `session.run` inside each request's
handler, Triton's binary tensor data): the baseline of `python -m bench.rest_vs_grpc`.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.generated import grpc_predict_v2_pb2 as pb
from serving.generated import grpc_predict_v2_pb2_grpc as pb_grpc

RAW_DTYPES = {"FP32": "<f4", "UINT8": "u1"}


class NaiveInference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str, options: ort.SessionOptions | None = None) -> None:
        self.session = ort.InferenceSession(
            model_path, options, providers=["CPUExecutionProvider"]
        )  # default threads unless `options` say otherwise
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        tensor = request.inputs[0]
        images = np.frombuffer(request.raw_input_contents[0], RAW_DTYPES[tensor.datatype]).reshape(
            tensor.shape
        )
        if tensor.datatype == "UINT8":
            images = images.astype(np.float32) / 255
        (probabilities,) = self.session.run([self.output_name], {self.input_name: images})
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(
            name=self.output_name, datatype="FP32", shape=list(probabilities.shape)
        )
        response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
        return response


def rest_app(inference: NaiveInference):
    """The naive REST server: aiohttp, `session.run` inline in each request's handler, KServe v2
    infer with Triton's binary tensor data (what tritonclient.http sends), no batching."""
    import json

    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        length = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        header = json.loads(body[:length])
        tensor = header["inputs"][0]
        images = np.frombuffer(body[length:], RAW_DTYPES[tensor["datatype"]]).reshape(
            tensor["shape"]
        )
        if tensor["datatype"] == "UINT8":
            images = images.astype(np.float32) / 255
        (probabilities,) = inference.session.run(
            [inference.output_name], {inference.input_name: images}
        )
        raw = probabilities.astype("<f4").tobytes()
        answer = json.dumps(
            {
                "model_name": request.match_info["model"],
                "outputs": [
                    {
                        "name": inference.output_name,
                        "datatype": "FP32",
                        "shape": list(probabilities.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
            }
        ).encode()
        return web.Response(
            body=answer + raw,
            headers={
                "Inference-Header-Content-Length": str(len(answer)),
                "Content-Type": "application/octet-stream",
            },
        )

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the ONNX file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, default=0, help="also serve REST here (aiohttp)")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    inference = NaiveInference(args.model)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    health_servicer = health.HealthServicer()  # so the benchmark waits for it like for mnist-serve
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if args.http_port:
        from aiohttp import web

        web.run_app(
            rest_app(inference), host="127.0.0.1", port=args.http_port, print=None, access_log=None
        )  # until SIGTERM/SIGINT
        server.stop(1).wait()
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
