"""The project's own API, mnist.v1.Classifier: wire messages ⇄ decoding and the served model."""
from __future__ import annotations

import grpc
import numpy as np

from serving.decoding import InvalidInput, decode_classify_images
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.repository import IMAGE_SHAPE, INPUT_NAME
from serving.served_model import ServedModel


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self._class_names = model.version.class_names

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        await self.model.check(request.model_name, request.model_version, context)
        try:
            images = decode_classify_images(request.images, self.model.max_batch_size)
        except InvalidInput as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        probabilities = await self.model.predict(images, context)
        labels = probabilities.argmax(axis=1)
        confidences = probabilities[np.arange(len(labels)), labels]
        return pb.ClassifyResponse(
            predictions=[
                pb.Prediction(label=int(label), class_name=self._class_names[label],
                              confidence=float(confidence), probabilities=row)
                for label, confidence, row in zip(labels, confidences, probabilities.tolist())
            ],
            model_name=self.model.name,
            model_version=self.model.version_label,
        )

    async def DescribeModel(self, request: pb.DescribeModelRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelDescription:
        await self.model.check(request.model_name, request.model_version, context)
        meta = self.model.version.metadata
        scalar_metadata = {key: str(value) for key, value in meta.items()
                           if isinstance(value, (str, int, float, bool)) and value is not None}
        return pb.ModelDescription(
            model_name=self.model.name,
            model_version=self.model.version_label,
            available_versions=[self.model.version_label],
            class_names=self._class_names,
            input_name=INPUT_NAME,
            input_shape=[-1, *IMAGE_SHAPE],
            input_datatype="FP32",
            max_batch_size=self.model.max_batch_size,
            test_accuracy=float(meta.get("test_accuracy") or 0.0),
            recipe=str(meta.get("recipe", "")),
            trained_at=str(meta.get("trained_at", "")),
            model_sha256=str(meta.get("model_sha256", "")),
            execution_provider=self.model.provider,
            metadata=scalar_metadata,
        )
