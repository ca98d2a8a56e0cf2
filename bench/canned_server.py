"""A server that answers Classify and KServe v2 ModelInfer with a canned response through the same
gRPC stack as mnist-serve.

Same grpc.aio server, options and per-call metrics; no decoding, batching or inference. Its
throughput is the ceiling the RPC layer puts on the real server, and, in `make loadtest`, the
ceiling of the load generator: every image is a 7 (Classify's label, ModelInfer's one-hot
probabilities), and DescribeModel answers as mnist-serve does, so the Locust users screen their
pool (the 7s) and judge every answer as they do against the real server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.contract import NUM_CLASSES, OUTPUT_DATATYPE, OUTPUT_NAME
from serving import event_loop, metrics
from serving.config import ServeConfig
from serving.generated import grpc_predict_v2_pb2 as kserve_pb
from serving.generated import grpc_predict_v2_pb2_grpc as kserve_grpc
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.grpc_api.handlers import WrappingRegistrar
from serving.server import channel_options

CANNED_PREDICTION = pb.Prediction(
    label=7, class_name="7", confidence=0.99, probabilities=[0.001] * 7 + [0.99] + [0.001] * 2
)


MAX_BATCH_SIZE = ServeConfig().max_batch_size
SEVEN = bytes(4 * 7) + b"\x00\x00\x80\x3f" + bytes(4 * 2)  # FP32 one-hot at 7 (little-endian 1.0)


class CannedClassifier(pb_grpc.ClassifierServicer):
    async def Classify(self, request, context):
        return pb.ClassifyResponse(
            predictions=[CANNED_PREDICTION] * len(request.images),
            model_name="mnist",
            model_version="1",
        )

    async def DescribeModel(self, request, context):
        return pb.ModelDescription(
            model_name="mnist",
            model_version="1",
            available_versions=["1"],
            class_names=[str(k) for k in range(NUM_CLASSES)],
            input_name="images",
            input_shape=[-1, 28, 28, 1],
            input_datatype="FP32",
            max_batch_size=MAX_BATCH_SIZE,
            execution_provider="canned",
        )


class CannedInference(kserve_grpc.GRPCInferenceServiceServicer):
    """ModelInfer answered with a 7 per image, in raw bytes as mnist-serve answers raw requests."""

    async def ModelInfer(self, request, context):
        images = request.inputs[0].shape[0]
        response = kserve_pb.ModelInferResponse(
            model_name="mnist", model_version="1", id=request.id
        )
        response.outputs.add(
            name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=[images, NUM_CLASSES]
        )
        response.raw_output_contents.append(SEVEN * images)
        return response


async def main(
    port: int, inference: kserve_grpc.GRPCInferenceServiceServicer | None = None
) -> None:
    """Serve on loopback `port` until SIGTERM; `inference`: ModelInfer's servicer (the canned one)."""
    server = grpc.aio.server(options=channel_options(ServeConfig()))
    # The server's per-call metrics, attached as the server does (serving.grpc_api.handlers).
    services = WrappingRegistrar(server, lambda method, handler: metrics.timed(handler, method))
    pb_grpc.add_ClassifierServicer_to_server(CannedClassifier(), services)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(inference or CannedInference(), services)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    event_loop.run(main(parser.parse_args().port))  # the server's loop: the same stack
