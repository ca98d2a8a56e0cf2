"""The Open Inference Protocol (KServe v2) gRPC API, as Triton, KServe and MLServer speak it."""
from __future__ import annotations

from typing import Callable

import grpc
import numpy as np

from serving import __version__
from serving.decoding import InvalidInput, decode_kserve_input
from serving.generated import grpc_predict_v2_pb2 as pb
from serving.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.repository import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from serving.served_model import ServedModel

PLATFORM = "onnxruntime_onnx"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel, is_ready: Callable[[], bool]) -> None:
        self.model = model
        self._is_ready = is_ready  # False while loading and while draining

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._is_ready() and self.model.serves(request.name, request.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mnist-serve", version=__version__, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        await self.model.check(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model.name,
            versions=[self.model.version_label],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, *IMAGE_SHAPE])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, NUM_CLASSES])],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        await self.model.check(request.model_name, request.model_version, context)
        try:
            images = _decode_request(request, self.model.max_batch_size)
        except InvalidInput as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        probabilities = await self.model.predict(images, context)
        response = pb.ModelInferResponse(model_name=self.model.name, model_version=self.model.version_label,
                                         id=request.id)
        output = response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=list(probabilities.shape))
        # Answer in the form the caller used: raw bytes (Triton's clients read only those) or typed values.
        if request.raw_input_contents:
            response.raw_output_contents.append(np.ascontiguousarray(probabilities, dtype="<f4").tobytes())
        else:
            output.contents.fp32_contents.extend(probabilities.ravel().tolist())
        return response


def _decode_request(request: pb.ModelInferRequest, max_batch_size: int) -> np.ndarray:
    if len(request.inputs) != 1:
        raise InvalidInput(f"the request has {len(request.inputs)} input tensors; this model takes exactly one, "
                           f"'{INPUT_NAME}' (FP32 or UINT8, shape [N, 28, 28, 1])")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                           f"{len(request.inputs)} inputs; send one per input")
    for requested in request.outputs:
        if requested.name != OUTPUT_NAME:
            raise InvalidInput(f"unknown output '{requested.name}'; this model's only output is '{OUTPUT_NAME}'")
    tensor = request.inputs[0]
    return decode_kserve_input(
        name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape),
        raw=request.raw_input_contents[0] if request.raw_input_contents else None,
        fp32_contents=tensor.contents.fp32_contents, uint_contents=tensor.contents.uint_contents,
        max_batch_size=max_batch_size,
    )
