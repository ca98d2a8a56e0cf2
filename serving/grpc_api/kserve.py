"""The Open Inference Protocol (KServe v2) gRPC API, as Triton, KServe and MLServer speak it.

A thin servicer: readiness comes from the Server, conversions from kserve_converters, and the
model core's errors become status codes in serving.grpc_api.status.
"""
from __future__ import annotations

from typing import Callable

from serving import __version__
from serving.generated import grpc_predict_v2_pb2 as pb
from serving.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.grpc_api import kserve_converters as convert
from serving.grpc_api.converters import deadline_of
from serving.inference.served_model import ServedModel


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel, is_ready: Callable[[], bool]) -> None:
        self.model = model
        self._is_ready = is_ready  # the Server's readiness: False while loading and while draining

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._is_ready() and self.model.serves(request.name, request.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mnist-serve", version=__version__, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        self.model.check(request.name, request.version)
        return convert.model_metadata(self.model)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self.model.check(request.model_name, request.model_version)
        images = convert.infer_images(request, self.model.max_batch_size)
        probabilities = await self.model.predict(images, deadline_of(context))
        return convert.infer_response(request, self.model, probabilities)
