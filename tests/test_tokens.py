"""Bearer tokens on the real server: a call without the right token is UNAUTHENTICATED, health and
metrics stay open, a rotated token is read without a restart, and the HTTP port keeps the same rule."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import ClassifierClient
from tests.support.pki import TOKEN
from tests.support.secured import classify_code, http_status


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_inference_without_the_right_token_is_unauthenticated(token_server, mnist_test_set, token):
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], token)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    with ClassifierClient(token_server.target, token=token) as client:
        for call in (lambda: client.infer_kserve(mnist_test_set[0][:1]), client.describe):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()


def test_the_right_token_is_served_and_health_and_metrics_stay_open(token_server, mnist_test_set):
    assert classify_code(token_server.target, None, mnist_test_set[0], TOKEN) == grpc.StatusCode.OK
    with ClassifierClient(token_server.target, token=TOKEN) as client:
        assert client.infer_kserve(mnist_test_set[0][:1]).shape == (1, 10)
    with grpc.insecure_channel(token_server.target) as channel:  # no token at all
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=None,
            response_deserializer=None,
        )(b"", timeout=10)
        assert live == b"\x08\x01"  # ServerLiveResponse(live=True)
    # Refusals are counted like any call; /metrics needs no token.
    assert (
        classify_code(token_server.target, None, mnist_test_set[0])
        == grpc.StatusCode.UNAUTHENTICATED
    )
    metrics = urllib.request.urlopen(token_server.metrics_url, timeout=5).read().decode()
    assert 'method="Classify"' in metrics and 'code="UNAUTHENTICATED"' in metrics


def test_a_rotated_token_is_read_without_a_restart(token_server, mnist_test_set):
    token_server.token_file.write_text("rotated-token\n")
    deadline = time.monotonic() + 10
    while (
        classify_code(token_server.target, None, mnist_test_set[0], "rotated-token")
        != grpc.StatusCode.OK
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], "rotated-token")
        == grpc.StatusCode.OK
    )
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], TOKEN)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    token_server.token_file.write_text(TOKEN + "\n")  # back, for the other tests of this server
    deadline = time.monotonic() + 10
    while (
        classify_code(token_server.target, None, mnist_test_set[0], TOKEN) != grpc.StatusCode.OK
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)


def test_the_http_port_needs_the_token_for_models_but_not_for_health(token_server):
    base = token_server.http_url
    assert http_status(base + "/v2/models/mnist") == 401
    assert http_status(base + "/v2/models/mnist", "wrong-token") == 401
    assert http_status(base + "/v2/models/mnist", TOKEN) == 200
    assert http_status(base + "/v2/health/ready") == 200
    assert http_status(base + "/v2/models/mnist/ready") == 200
