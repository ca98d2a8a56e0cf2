"""OpenTelemetry tracing of calls on one traced mnist-serve process, against a real OTLP receiver.

A call carrying a W3C traceparent, over gRPC (both APIs) and REST, yields a server span that is its
child, with the model and version that answered; decode, queue, batch and onnxruntime.run spans
under it; the batch span linked to the call and the call's queue span linked to the batch."""

from __future__ import annotations

import grpc
import pytest

from bench.otlp_sink import ReceivedSpan
from serving import tracing
from serving.client import ClassifierClient
from serving.rest_client import RestClient
from tests.support.common import predict_args, run_predict
from tests.support.tracing import SERVER_KIND, STAGES, check_call_trace, in_trace


def test_grpc_calls_with_a_traceparent_are_children_of_it(traced_server, receiver, mnist_test_set):
    images = mnist_test_set[0][:3]
    classify_parent, infer_parent = tracing.new_traceparent(), tracing.new_traceparent()
    with ClassifierClient(
        traced_server.target, traceparent=classify_parent, tracestate="vendor=1"
    ) as client:
        assert len(client.classify(images).labels) == 3
    with ClassifierClient(traced_server.target, traceparent=infer_parent) as client:
        assert client.infer_kserve(images).shape == (3, 10)
    spans = receiver.wait_for(
        lambda s: (
            in_trace(tracing.trace_id_of(classify_parent), STAGES)(s)
            and in_trace(tracing.trace_id_of(infer_parent), STAGES)(s)
        )
    )
    call = check_call_trace(spans, classify_parent, "mnist.v1.Classifier/Classify")
    assert call.attributes["rpc.system"] == "grpc" and call.attributes["rpc.grpc.status_code"] == 0
    assert call.status_code == 0  # unset: the call succeeded
    check_call_trace(spans, infer_parent, "inference.GRPCInferenceService/ModelInfer")


def test_a_rest_call_with_a_traceparent_is_a_child_of_it(traced_server, receiver, mnist_test_set):
    parent = tracing.new_traceparent()
    with RestClient(f"127.0.0.1:{traced_server.http_port}", traceparent=parent) as client:
        assert client.infer(mnist_test_set[0][:2]).shape == (2, 10)
    spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
    call = check_call_trace(spans, parent, "POST /v2/models/{model}/infer")
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["url.path"] == "/v2/models/mnist/infer"


def test_a_call_without_a_traceparent_starts_a_trace(traced_server, receiver, mnist_test_set):
    before = {s.trace_id for s in receiver.spans()}
    with ClassifierClient(traced_server.target) as client:
        client.classify(mnist_test_set[0][:1])
    spans = receiver.wait_for(
        lambda s: any(
            x.kind == SERVER_KIND
            and x.parent_span_id == ""
            and x.trace_id not in before
            and x.name.endswith("/Classify")
            for x in s
        )
    )
    root = next(
        x
        for x in spans
        if x.kind == SERVER_KIND and x.parent_span_id == "" and x.trace_id not in before
    )
    assert {x.name for x in spans if x.trace_id == root.trace_id} >= {"decode", "queue", "batch"}


def test_concurrent_calls_share_a_batch_linked_to_each(traced_server, receiver, mnist_test_set):
    """Calls that queue while a batch runs are computed together: one batch span links them all."""
    import concurrent.futures

    parents = [tracing.new_traceparent() for _ in range(24)]
    clients = [ClassifierClient(traced_server.target, traceparent=p) for p in parents]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            for _round in range(
                5
            ):  # enough calls at once that some meet in the queue on a loaded machine
                list(pool.map(lambda c: c.infer_kserve(mnist_test_set[0][:8]), clients))
    finally:
        for client in clients:
            client.close()
    ids = {tracing.trace_id_of(p) for p in parents}
    spans = receiver.wait_for(
        lambda s: sum(x.kind == SERVER_KIND and x.trace_id in ids for x in s) == 5 * len(parents)
    )
    servers = {x.span_id: x for x in spans if x.kind == SERVER_KIND and x.trace_id in ids}
    batches = [
        x for x in spans if x.name == "batch" and any(link[1] in servers for link in x.links)
    ]
    linked = [link[1] for batch in batches for link in batch.links]
    assert sorted(linked) == sorted(servers)  # every call is linked from exactly one batch
    shared = [b for b in batches if b.attributes["batch.requests"] > 1]
    assert shared, "no two of 120 concurrent calls were batched together"
    for batch in shared:
        assert len(batch.links) == batch.attributes["batch.requests"]
        assert batch.attributes["batch.size"] == 8 * batch.attributes["batch.requests"]


def test_failed_calls_carry_their_status(traced_server, receiver, mnist_test_set):
    parent = tracing.new_traceparent()
    with ClassifierClient(traced_server.target, traceparent=parent) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.classify(mnist_test_set[0][:1], model_name="no-such-model")
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent)))
    call = next(
        s for s in spans if s.trace_id == tracing.trace_id_of(parent) and s.kind == SERVER_KIND
    )
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert call.attributes["model_name"] == "no-such-model"  # what was asked for
    assert (
        call.status_code == 0
    )  # the caller's mistake, not the server's fault (OpenTelemetry's RPC rules)


def test_health_checks_are_not_traced(traced_server, receiver):
    with ClassifierClient(traced_server.target) as client:
        client.wait_until_ready(30)
        client.describe()  # traced, after the health check: once it arrives, the check would have
    with RestClient(f"127.0.0.1:{traced_server.http_port}") as rest:
        assert rest.is_ready()  # GET /v2/health/ready
        rest.json_call("GET", "/v2/models/mnist")  # traced, after it
    spans = receiver.wait_for(
        lambda s: (
            any(x.name.endswith("/DescribeModel") for x in s)
            and any(x.name == "GET /v2/models/{model}" for x in s)
        )
    )
    assert not [s.name for s in spans if "Health" in s.name or "/health/" in s.name]


def test_mnist_predict_sends_a_traceparent(traced_server, receiver, mnist_path):
    parent = tracing.new_traceparent()
    result = run_predict(
        *predict_args(traced_server.target, mnist_path, 5), "--traceparent", parent, "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert tracing.trace_id_of(parent) in result.stderr
    check_call_trace(
        receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES)),
        parent,
        "mnist.v1.Classifier/Classify",
    )
    bad = run_predict("--mnist-test", "1", "--traceparent", "x")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "not a W3C traceparent" in bad.stderr


@pytest.mark.timeout(400)
def test_locust_users_send_a_fresh_trace_per_call(
    traced_server, receiver, mnist_path, tmp_path, monkeypatch
):
    """--traceparent per-call: every Locust call (gRPC both APIs, and REST) is its own trace, the
    child of the span id it sent."""
    from loadtest.locust_report import read_stats_csv
    from loadtest.locust_runner import run_locust

    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_path))
    before = {s.trace_id for s in receiver.spans()}
    run_locust(
        traced_server.target,
        scenario="mix",
        mix_weights="2,1,1,1",
        users=2,
        spawn_rate=2,
        run_time="4s",
        processes=1,
        csv_prefix=tmp_path / "traced",
        log_path=tmp_path / "locust.log",
        images_per_call=4,
        extra=[
            "--traceparent",
            "per-call",
            "--pool-size",
            "200",
            "--http-host",
            f"127.0.0.1:{traced_server.http_port}",
        ],
    )
    stats = read_stats_csv(tmp_path / "traced_stats.csv")["Aggregated"]
    assert stats.requests > 0 and stats.failures == 0, (tmp_path / "locust.log").read_text()[-2000:]

    def children(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.kind == SERVER_KIND
            and s.trace_id not in before
            and s.parent_span_id
            and not s.name.endswith("DescribeModel")
        ]

    spans = receiver.wait_for(lambda s: len(children(s)) >= stats.requests, timeout=60)
    calls = children(spans)
    assert len({s.trace_id for s in calls}) == len(calls)  # a trace of its own per call
    assert {s.name for s in calls} == {
        "mnist.v1.Classifier/Classify",
        "inference.GRPCInferenceService/ModelInfer",
        "POST /v2/models/{model}/infer",
    }
