"""KServe v2 (Open Inference Protocol) messages ⇄ the model core's arrays."""

from __future__ import annotations

import numpy as np

from core import contract
from serving import tracing
from serving.generated import grpc_predict_v2_pb2 as pb
from serving.inference.served_model import ServedModel
from serving.inputs.wire import (
    check_kserve_request,
    decode_common_kserve_input,
    decode_kserve_input,
)

PLATFORM = "onnxruntime_onnx"


def infer_images(request: pb.ModelInferRequest, max_batch_size: int) -> np.ndarray:
    """The request's one input tensor as the model's input batch; InvalidInput says what is wrong."""
    # The common request (one raw tensor, no other fields, the default output) skips the full
    # checks below: they touch every field of the message, and all of them cost per call. With
    # tracing on, every request takes the full checks, which record the call's decode span.
    raw = request.raw_input_contents
    if (
        not tracing.on
        and len(raw) == 1
        and len(request.inputs) == 1
        and _default_outputs(request.outputs)
    ):
        tensor = request.inputs[0]
        if not tensor.HasField("contents"):
            images = decode_common_kserve_input(
                tensor.name, tensor.datatype, tensor.shape, raw[0], max_batch_size
            )
            if images is not None:
                return images
    check_kserve_request(
        len(request.inputs),
        len(request.raw_input_contents),
        [requested.name for requested in request.outputs],
    )
    tensor = request.inputs[0]
    # The other typed fields by size only: any of them is an error, and len() copies nothing.
    others = {
        field.name: len(values)
        for field, values in tensor.contents.ListFields()
        if field.name not in ("fp32_contents", "uint_contents")
    }
    return decode_kserve_input(
        name=tensor.name,
        datatype=tensor.datatype,
        shape=tensor.shape,  # not list(): it may hold millions
        raw=request.raw_input_contents[0] if request.raw_input_contents else None,
        fp32_contents=tensor.contents.fp32_contents,
        uint_contents=tensor.contents.uint_contents,
        max_batch_size=max_batch_size,
        other_contents=others,
    )


def _default_outputs(outputs) -> bool:
    """No output asked for, or only the model's one (tritonclient names it)."""
    return not outputs or (len(outputs) == 1 and outputs[0].name == contract.OUTPUT_NAME)


def infer_response(
    request: pb.ModelInferRequest, model: ServedModel, probabilities: np.ndarray
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version_label, id=request.id
    )
    output = response.outputs.add(
        name=contract.OUTPUT_NAME,
        datatype=contract.OUTPUT_DATATYPE,
        shape=list(probabilities.shape),
    )
    # Answer in the form the caller used: raw bytes (Triton's clients read only those) or typed values.
    if request.raw_input_contents:
        response.raw_output_contents.append(
            np.ascontiguousarray(
                probabilities, dtype=contract.KSERVE_DTYPES[contract.OUTPUT_DATATYPE]
            ).tobytes()
        )
    else:
        output.contents.fp32_contents.extend(probabilities.ravel().tolist())
    return response


def model_metadata(
    model: ServedModel, versions: list[int] | None = None
) -> pb.ModelMetadataResponse:
    """The model's tensors; `versions`: every ready version of it (default: this one)."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in versions] if versions else [model.version_label],
        platform=PLATFORM,
        inputs=[
            tensor(
                name=contract.INPUT_NAME,
                datatype=contract.INPUT_DATATYPE,
                shape=contract.input_shape(),
            )
        ],
        outputs=[
            tensor(
                name=contract.OUTPUT_NAME,
                datatype=contract.OUTPUT_DATATYPE,
                shape=contract.output_shape(len(model.class_names)),
            )
        ],
    )
