"""The Open Inference Protocol (KServe v2) gRPC API, as Triton, KServe and MLServer speak it,
with Triton's extensions: ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad/Unload.

A thin servicer: readiness comes from the Server, each call's (model, version) from the model
lookup (the registry: models -> versions), conversions from kserve_converters and triton, and
the model core's errors become status codes in serving.grpc_api.status.
"""

from __future__ import annotations

from collections.abc import Callable

from serving import __version__
from serving.generated import grpc_predict_v2_pb2 as pb
from serving.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.grpc_api import kserve_converters as convert
from serving.grpc_api import triton
from serving.grpc_api.converters import deadline_of
from serving.inference.served_model import ModelLookup


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, lookup: ModelLookup, is_ready: Callable[[], bool]) -> None:
        self.lookup = lookup  # the registry; a lone ServedModel in in-process tests
        self._is_ready = is_ready  # the Server's readiness: False while loading and while draining
        self.triton = triton.TritonExtensions(lookup)

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._is_ready() and self.lookup.is_ready(request.name, request.version)
        )

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="mnist-serve", version=__version__, extensions=self.triton.extensions
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        model = self.lookup.resolve(request.name, request.version)
        return convert.model_metadata(model, self.lookup.ready_versions(model.name))

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        # Looked up and queued with no await between: the call finishes on the version it found.
        model = self.lookup.resolve(request.model_name, request.model_version)
        images = convert.infer_images(request, model.max_batch_size)
        probabilities = await model.predict(images, deadline_of(context), request.id)
        return convert.infer_response(request, model, probabilities)

    # ---- Triton's extensions: checks and answers live in triton.TritonExtensions, shared with REST ----

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.triton.config(request.name, request.version))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        return self.triton.statistics(request.name, request.version)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        return self.triton.index(ready_only=request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        await self.triton.load(request.model_name, request.parameters.keys())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.triton.unload(request.model_name, request.parameters.keys())
        return pb.RepositoryModelUnloadResponse()
