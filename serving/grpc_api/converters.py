"""mnist.v1 messages ⇄ the model core's arrays and metadata, and the call's deadline.

KServe v2 messages have their own module (kserve_converters): its stubs clash with
tritonclient's when both are imported, so only the server process loads them.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from core import contract
from serving.generated import mnist_classifier_pb2 as pb
from serving.inference.served_model import ServedModel
from serving.inputs.wire import decode_classify_images


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() instant (None when the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's (or Envoy's) x-request-id metadata, bounded; "" without one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            return value[:128]
    return ""


def classify_images(request: pb.ClassifyRequest, max_batch_size: int) -> np.ndarray:
    """The request's images as the model's input batch; InvalidInput says what is wrong."""
    return decode_classify_images(request.images, max_batch_size)


def classify_response(model: ServedModel, probabilities: np.ndarray) -> pb.ClassifyResponse:
    """One Prediction per row of probabilities, in request order."""
    labels = probabilities.argmax(axis=1)
    confidences = probabilities[np.arange(len(labels)), labels]
    class_names = model.class_names
    return pb.ClassifyResponse(
        predictions=[
            pb.Prediction(
                label=int(label),
                class_name=class_names[label],
                confidence=float(confidence),
                probabilities=row,
            )
            for label, confidence, row in zip(labels, confidences, probabilities.tolist())
        ],
        model_name=model.name,
        model_version=model.version_label,
    )


def model_description(model: ServedModel, versions: list[int] | None = None) -> pb.ModelDescription:
    """The version's description; `versions`: every ready version of the model (default: this one)."""
    meta = model.metadata
    return pb.ModelDescription(
        model_name=model.name,
        model_version=model.version_label,
        available_versions=[str(v) for v in versions] if versions else [model.version_label],
        class_names=model.class_names,
        input_name=contract.INPUT_NAME,
        input_shape=contract.input_shape(),
        input_datatype=contract.INPUT_DATATYPE,
        max_batch_size=model.max_batch_size,
        test_accuracy=float(meta.test_accuracy or 0.0),
        recipe=meta.recipe,
        trained_at=meta.trained_at,
        model_sha256=meta.model_sha256,
        execution_provider=model.provider,
        metadata=meta.scalars(),
    )
