"""The project's own API, mnist.v1.Classifier: a thin servicer over the converters and the model.

Errors are the model core's (UnknownModel, InvalidInput, QueueFull...); serving.grpc_api.status
turns them into status codes (attached to every method by serving.grpc_api.handlers). Encoded
images are decoded off the event loop by the DecodePool (serving.inputs.pool), within its per-call pixel budget.
"""

from __future__ import annotations

import grpc

from serving import payload_log
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.grpc_api import converters
from serving.inference.served_model import ModelLookup
from serving.inputs.pool import DecodePool


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, lookup: ModelLookup, decoder: DecodePool | None = None) -> None:
        self.lookup = lookup  # the registry: each call's (model, version) is looked up in it
        self.decoder = decoder or DecodePool()

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        # The version is chosen once, here; the answer names it (a retired version still finishes this call).
        model = self.lookup.resolve(request.model_name, request.model_version)
        images = await self.decoder.classify_images(request.images, self.lookup.max_batch_size)
        request_id = converters.request_id_of(context) if payload_log.active is not None else ""
        probabilities = await model.predict(images, converters.deadline_of(context), request_id)
        return converters.classify_response(model, probabilities)

    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelDescription:
        model = self.lookup.resolve(request.model_name, request.model_version)
        return converters.model_description(model, self.lookup.ready_versions(model.name))
