"""The gRPC client of the MNIST service, shared by the CLI, the tests and the load tests.

Its KServe v2 inference calls are InferenceClient, the interface serving.rest_client.RestClient
offers over REST too: the same method names, arguments and answers on both transports.

A target is anything gRPC resolves: `host:port`, `dns:///host:port` (every address the name
resolves to, e.g. a Kubernetes headless Service) or `ipv4:a:port,b:port`. Calls are balanced per
call over every address (gRPC's round_robin policy), and inference calls that meet UNAVAILABLE
(a replica draining or gone) are retried by gRPC itself, a bounded number of times with backoff.
Other RPC failures propagate as grpc.RpcError: callers decide whether to retry or report.
The channel (balancing, retries, TLS, the flags' client_security) is serving/client_channel.py.
With `tls` the channel is TLS (mTLS when it names a client certificate); with `token` every call
carries "authorization: Bearer <token>" (servers run with --tls-cert, --tls-client-ca and
--auth-token-file: see serving.security). With `traceparent` (a W3C traceparent, or a function
that makes one per call, e.g. serving.tracing.new_traceparent) every call carries it and
`tracestate`, so a traced server's spans join the caller's trace.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.contract import (
    IMAGE_SHAPE,
    IMAGE_SIDE,
    INPUT_NAME,
    KSERVE_DTYPES,
    OUTPUT_DATATYPE,
    PIXELS,
)
from serving import tracing
from serving.client_channel import ClientTls, open_channel
from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc

_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class ClassifyResult:
    """One Classify call's answer, one row per image in request order."""

    labels: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, classes]
    class_names: list[str]  # the predicted class's name, per image
    model_name: str
    model_version: str
    response_bytes: int  # serialized response size, for load-test reports


@dataclass(frozen=True)
class KServeAnswer:
    """One ModelInfer answer: the probabilities, and the model and version that computed them."""

    probabilities: np.ndarray  # float32 [N, classes]
    model_name: str
    model_version: str


@runtime_checkable
class InferenceClient(Protocol):
    """KServe v2 inference as both clients offer it: the same names, arguments and answers over
    gRPC (ClassifierClient) and REST (serving.rest_client.RestClient), so a caller picks the
    transport and nothing else changes."""

    def infer_kserve(
        self, images: np.ndarray, model_name: str = "mnist", model_version: str = ""
    ) -> np.ndarray: ...
    def infer_kserve_answer(
        self, images: np.ndarray, model_name: str = "mnist", model_version: str = ""
    ) -> KServeAnswer: ...
    def wait_until_ready(self, timeout: float) -> None: ...
    def close(self) -> None: ...


class ClassifierClient:
    """A synchronous channel to the service's mnist.v1.Classifier and KServe v2 APIs."""

    def __init__(
        self,
        target: str = "localhost:8500",
        timeout: float = 10.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        min_resolution_interval: float | None = None,
        tls: ClientTls | None = None,
        token: str | None = None,
        traceparent: tracing.TraceHeader = None,
        tracestate: str | None = None,
    ) -> None:
        """`min_resolution_interval`: the fewest seconds between two DNS lookups of a `dns:` target
        (gRPC's default, 30 s, when None); a lookup follows every lost or aged connection."""
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, max_message_bytes, min_resolution_interval, tls)
        # Sent with every call; servers without --auth-token-file ignore it.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._trace_headers = tracing.outgoing(traceparent, tracestate)  # ValueError: malformed
        self._classifier = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model_infer: grpc.UnaryUnaryMultiCallable | None = (
            None  # built on first use: see _kserve_message_types
        )

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(
        self, images: np.ndarray, model_name: str = "", model_version: str = ""
    ) -> ClassifyResult:
        """Classify uint8 images (sent as raw_pixels) or float images in [0, 1] (sent as float_pixels)."""
        pixels = _as_batch(images).reshape(-1, PIXELS)
        if pixels.dtype == np.uint8:
            messages = [pb.Image(raw_pixels=row.tobytes()) for row in pixels]
        elif np.issubdtype(pixels.dtype, np.floating):
            messages = [
                pb.Image(float_pixels=pb.FloatPixels(values=row.tolist()))
                for row in pixels.astype(np.float32)
            ]
        else:
            raise ValueError(
                f"images have dtype {pixels.dtype}; send uint8 (0..255) or floats in [0, 1]"
            )
        return self._classify(messages, model_name, model_version)

    def classify_encoded(
        self, blobs: Sequence[bytes], model_name: str = "", model_version: str = ""
    ) -> ClassifyResult:
        """Classify PNG or JPEG files; the server frames each digit the way MNIST was made."""
        return self._classify([pb.Image(encoded=blob) for blob in blobs], model_name, model_version)

    def describe(self, model_name: str = "", model_version: str = "") -> pb.ModelDescription:
        request = pb.DescribeModelRequest(model_name=model_name, model_version=model_version)
        return self._classifier.DescribeModel(
            request, timeout=self.timeout, metadata=self._call_metadata()
        )

    def infer_kserve(
        self, images: np.ndarray, model_name: str = "mnist", model_version: str = ""
    ) -> np.ndarray:
        """Probabilities [N, classes] through KServe v2 ModelInfer (UINT8 when given uint8, else FP32).

        `model_version` empty: the newest ready version of the model.
        """
        return self.infer_kserve_answer(images, model_name, model_version).probabilities

    def infer_kserve_answer(
        self, images: np.ndarray, model_name: str = "mnist", model_version: str = ""
    ) -> KServeAnswer:
        """ModelInfer's probabilities with the model and version that computed them."""
        batch = _as_batch(images)
        datatype = "UINT8" if batch.dtype == np.uint8 else "FP32"
        request_type, response_type = _kserve_message_types()
        request = request_type(model_name=model_name, model_version=model_version)
        request.inputs.add(name=INPUT_NAME, datatype=datatype, shape=[len(batch), *IMAGE_SHAPE])
        request.raw_input_contents.append(batch.astype(KSERVE_DTYPES[datatype]).tobytes())
        if self._model_infer is None:
            self._model_infer = self._channel.unary_unary(
                _MODEL_INFER,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
        response = self._model_infer(request, timeout=self.timeout, metadata=self._call_metadata())
        return KServeAnswer(_first_output(response), response.model_name, response.model_version)

    def wait_until_ready(self, timeout: float) -> None:
        """Block until grpc.health.v1 reports the server ("" service) SERVING, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(remaining, 1.0),
                    wait_for_ready=True,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        raise TimeoutError(
            f"the server at {self.target} was not SERVING within {timeout:g}s (last: {last}); "
            "check that it is running, listening on that address and that its model loaded"
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self._trace_headers is None:
            return self._metadata
        return (*(self._metadata or ()), *self._trace_headers())

    def _classify(
        self, images: list[pb.Image], model_name: str, model_version: str
    ) -> ClassifyResult:
        request = pb.ClassifyRequest(
            images=images, model_name=model_name, model_version=model_version
        )
        response = self._classifier.Classify(
            request, timeout=self.timeout, metadata=self._call_metadata()
        )
        predictions = response.predictions
        return ClassifyResult(
            labels=np.array([p.label for p in predictions], dtype=np.int64),
            probabilities=np.array([p.probabilities for p in predictions], dtype=np.float32),
            class_names=[p.class_name for p in predictions],
            model_name=response.model_name,
            model_version=response.model_version,
            response_bytes=response.ByteSize(),
        )


def _as_batch(images: np.ndarray) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 4 and batch.shape[-1] == 1:
        batch = batch[..., 0]
    if batch.ndim != 3 or batch.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(batch) == 0:
        raise ValueError(
            f"images have shape {batch.shape}; expected [N, 28, 28] or [N, 28, 28, 1] with N >= 1"
        )
    return batch


def _kserve_message_types() -> tuple[Any, Any]:
    """ModelInferRequest/Response classes, from whichever file registered `inference.*`.

    tritonclient registers the same symbols from its own file, and registering ours
    too would clash; the wire format is the same, so either file's classes will do.
    """
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName("inference.ModelInferRequest")
    except KeyError:
        from serving.generated import grpc_predict_v2_pb2  # noqa: F401  (registers the messages)
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
        for name in ("ModelInferRequest", "ModelInferResponse")
    )


def _first_output(response: Any) -> np.ndarray:
    output = response.outputs[0]
    if output.datatype != OUTPUT_DATATYPE:
        raise ValueError(
            f"the server answered with a {output.datatype} output; expected FP32 probabilities"
        )
    if response.raw_output_contents:
        values = np.frombuffer(
            response.raw_output_contents[0], dtype=KSERVE_DTYPES[OUTPUT_DATATYPE]
        )
    else:
        values = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    return values.astype(np.float32).reshape(tuple(output.shape))
