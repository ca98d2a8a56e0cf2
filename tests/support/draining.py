"""Calls held in a server's queue on purpose, and the server's health: what the draining tests
(and others that stop a server under load) use to know which calls were accepted."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.generated import mnist_classifier_pb2 as pb
from serving.generated import mnist_classifier_pb2_grpc as pb_grpc
from serving.process import ServerProcess, start_server
from tests.support.lifecycle import wait_for

REFUSAL = "the server is shutting down and takes no new requests"


def classify(
    target: str, image: np.ndarray, timeout: float = 60, together: threading.Barrier | None = None
) -> tuple[str, object]:
    """One Classify call on a plain channel (no client retries: the server's own answer is kept).

    The channel connects first, and callers sharing `together` then go at once: on a busy machine
    held calls still reach the queue within its hold, not a connection set-up apart.
    """
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        if together is not None:
            together.wait(30)
        try:
            response = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(raw_pixels=image.tobytes())]), timeout=timeout
            )
            return "ok", response.predictions[0].label
        except grpc.RpcError as err:
            return err.code().name, err.details()


def in_background(function, *args):
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(function(*args)))
    thread.start()

    def result():
        thread.join(90)
        assert outcome, "the call never returned"
        return outcome[0]

    return result


def queue_depth(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(("mnist_queue_depth ", "mnist_queue_depth{"))
    )


def health(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            return err.code().name


def hold_calls(server, images: np.ndarray) -> list:
    """Send one call per image and return once all of them wait in the server's queue."""
    together = threading.Barrier(len(images))
    results = [in_background(classify, server.target, image, 60, together) for image in images]
    wait_for(
        lambda: queue_depth(server) == len(images), 30, f"{len(images)} calls held in the queue"
    )
    return results


def own_channel(target: str) -> grpc.Channel:
    """serving/client_channel.py's channel (round_robin, retries of UNAVAILABLE, health checks
    for several addresses) on connections of its own: gRPC shares one connection among channels
    with equal settings, so callers with a ClassifierClient each would all reach one worker."""
    from serving.client_channel import MULTI_ADDRESS_SCHEMES, service_config

    health_check = target.startswith(MULTI_ADDRESS_SCHEMES)
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(health_check=health_check)),
        ],
    )


def model_infer(channel: grpc.Channel, images: np.ndarray) -> np.ndarray:
    """One KServe ModelInfer call of uint8 images: the probabilities."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="images", datatype="UINT8", shape=[len(images), 28, 28, 1])
    request.raw_input_contents.append(np.ascontiguousarray(images, np.uint8).tobytes())
    response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(len(images), -1)


def start_holding_server(
    repository, log_path, hold_us: int, grace_period_s: int, workers: int = 1
) -> ServerProcess:
    """A server that holds a lone call in its queue for `hold_us` (waiting for company), so a test
    knows which calls were accepted before it signals; drains for up to `grace_period_s`."""
    return start_server(
        repository,
        *("--workers", str(workers), "--max-queue-delay-us", str(hold_us)),
        *("--grace-period", str(grace_period_s)),
        log_path=log_path,
    )


def start_draining_server(repository, log_path, workers: int) -> ServerProcess:
    """`workers` workers with a 10 s grace period and no metrics port: the drain-under-load cases."""
    return start_server(
        repository,
        *("--workers", str(workers), "--grace-period", "10", "--metrics-port", "0"),
        log_path=log_path,
    )
