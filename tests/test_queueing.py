"""A server of its own that holds calls in its queue: a full queue sheds, expired calls are dropped."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.process import start_server
from tests.support.lifecycle import wait_for
from tests.support.serving import metric, rpc_error

# A server that holds a lone call in its queue for 4 s (a partial batch waiting for company), with
# room for two: calls are in the queue, deterministically, while a test looks.
HOLD_US = 4_000_000


@pytest.fixture(scope="module")
def holding_server(trained_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("holding") / "server.log"
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--max-queue-delay-us",
        str(HOLD_US),
        "--max-queue-size",
        "2",
        log_path=log,
    ) as running:
        yield running


def call_in_background(
    target: str, images: np.ndarray, timeout: float = 30, together: threading.Barrier | None = None
):
    """Start one Classify call on its own thread; returns a function that waits for its outcome.

    The channel connects first (and the callers sharing `together` wait for each other), so on a
    busy machine the calls still reach the queue within the hold, not a connection set-up apart.
    """
    outcome: dict[str, object] = {}

    def call():
        with ClassifierClient(target, timeout=timeout) as c:
            c.wait_until_ready(30)
            if together is not None:
                together.wait(30)
            try:
                outcome["labels"] = c.classify(images).labels.tolist()
            except grpc.RpcError as err:
                outcome["error"] = (err.code(), err.details())

    thread = threading.Thread(target=call)
    thread.start()

    def result():
        thread.join(60)
        assert not thread.is_alive(), "the call never returned"
        return outcome

    return result


def test_a_full_queue_answers_resource_exhausted_and_the_queued_are_served(
    holding_server, mnist_test_set, reference
):
    images, _ = mnist_test_set
    server = holding_server
    shed_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="queue_full")
    together = threading.Barrier(2)
    held = [call_in_background(server.target, images[i : i + 1], together=together) for i in (0, 1)]
    wait_for(lambda: metric(server, "mnist_queue_depth") == 2, 30, "two calls held in the queue")
    with ClassifierClient(server.target, timeout=30) as c:
        error = rpc_error(lambda: c.classify(images[2:3]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "the request queue is full (2 requests waiting); retry with backoff" in error.details()
    ), error.details()
    assert metric(server, "mnist_dropped_requests_total", reason="queue_full") == shed_before + 1
    expected = reference(images[:2]).argmax(axis=1).tolist()
    assert [outcome()["labels"] for outcome in held] == [[expected[0]], [expected[1]]]


def test_calls_that_expire_while_queued_are_dropped_not_computed(holding_server, mnist_test_set):
    images, _ = mnist_test_set
    server = holding_server
    images_before, batches_before = (
        metric(server, "mnist_images_total"),
        metric(server, "mnist_batch_size_count"),
    )
    cancelled_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="cancelled")
    expired_before = metric(server, "mnist_dropped_requests_total", 0.0, reason="deadline")

    # gRPC: the caller's deadline (1.5 s) ends the call while it waits in the queue (4 s). The client's
    # own DEADLINE_EXCEEDED, and gRPC cancels the call on the server, which drops it unrun.
    outcome = call_in_background(server.target, images[:1], timeout=1.5)
    wait_for(lambda: metric(server, "mnist_queue_depth") == 1, 30, "the call held in the queue")
    assert outcome()["error"] == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    wait_for(
        lambda: (
            metric(server, "mnist_dropped_requests_total", 0.0, reason="cancelled")
            == cancelled_before + 1
        ),
        30,
        "the cancelled call dropped from the queue",
    )

    # REST: the request's own `timeout` (µs) is the server's deadline: its own 504, with its own words.
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 784],
                    "data": images[0].ravel().tolist(),
                }
            ],
            "parameters": {"timeout": 1_500_000},
        }
    ).encode()
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/mnist/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 504
    assert "the deadline passed while the request was queued" in caught.value.read().decode()
    assert metric(server, "mnist_dropped_requests_total", reason="deadline") == expired_before + 1

    # Neither was ever computed: the model saw no image and ran no batch.
    assert metric(server, "mnist_images_total") == images_before
    assert metric(server, "mnist_batch_size_count") == batches_before
    with ClassifierClient(server.target) as c:
        assert c.classify(images[:64]).labels.shape == (64,)  # a full batch runs at once
