"""Tracing on servers of their own: with --workers 2 (each worker exports its own spans), with TLS
and the token, over OTLP/HTTP, and with samplers (at 0 nothing but an explicitly sampled caller's
trace is exported; a ratio records its share)."""

from __future__ import annotations

import grpc
import pytest

from bench.otlp_sink import OtlpHttpReceiver, OtlpReceiver
from serving import tracing
from serving.client import ClassifierClient, ClientTls
from serving.process import start_server
from serving.rest_client import RestClient
from tests.support.pki import issue, make_ca, tls_args
from tests.support.tracing import (
    SERVER_KIND,
    STAGES,
    check_call_trace,
    in_trace,
    opentelemetry_server,
    tracing_env,
)


def test_workers_each_export_their_own_spans(
    trained_repository, receiver, mnist_test_set, tmp_path
):
    with start_server(
        trained_repository,
        "--workers",
        "2",
        env=tracing_env(receiver),
        log_path=tmp_path / "server.log",
    ) as server:
        parents, seen = [], set()
        for _ in range(40):  # new connections until the kernel gave some to each worker
            parent = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=parent) as client:
                client.classify(mnist_test_set[0][:1])
            parents.append(parent)
            spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
            call = check_call_trace(spans, parent, "mnist.v1.Classifier/Classify")
            seen.add(call.resource["mnist.worker"])
            assert call.resource["process.pid"] != server.proc.pid  # a worker's, not the parent's
            if len(seen) == 2 and len(parents) >= 4:
                break
        assert seen == {0, 1}
        rest_parent = tracing.new_traceparent()
        with RestClient(f"127.0.0.1:{server.http_port}", traceparent=rest_parent) as client:
            client.infer(mnist_test_set[0][:1])
        check_call_trace(
            receiver.wait_for(in_trace(tracing.trace_id_of(rest_parent), STAGES)),
            rest_parent,
            "POST /v2/models/{model}/infer",
        )


def test_sampler_at_zero_exports_only_what_a_sampled_caller_asks_for(
    trained_repository, mnist_test_set, tmp_path
):
    """--trace-sample-ratio 0: calls starting a trace, or whose caller did not sample, export none.
    A caller's sampled traceparent is still followed (parent-based), which also proves this server
    does export: its trace is the only one that arrives."""
    with OtlpReceiver() as receiver:
        with opentelemetry_server(
            trained_repository,
            receiver,
            "--trace-sample-ratio",
            "0",
            log_path=tmp_path / "server.log",
        ) as server:
            unsampled = tracing.new_traceparent(sampled=False)
            with (
                ClassifierClient(server.target) as plain,
                ClassifierClient(server.target, traceparent=unsampled) as declined,
            ):
                for _ in range(20):
                    plain.classify(mnist_test_set[0][:2])
                    declined.infer_kserve(mnist_test_set[0][:2])
            with RestClient(f"127.0.0.1:{server.http_port}") as rest:
                rest.infer(mnist_test_set[0][:2])
            sampled = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=sampled) as client:
                client.classify(mnist_test_set[0][:1])
            receiver.wait_for(in_trace(tracing.trace_id_of(sampled), STAGES))
            server.stop()  # the processor's shutdown exports whatever it still held
        assert "TraceIdRatioBased{0.0}" in server.log()
        assert {s.trace_id for s in receiver.spans()} == {tracing.trace_id_of(sampled)}


def test_the_standard_sampler_variables_are_honoured(trained_repository, mnist_test_set, tmp_path):
    """OTEL_TRACES_SAMPLER=traceidratio, _ARG=0 ignores even a sampled caller: nothing leaves."""
    with OtlpReceiver() as receiver:
        env = tracing_env(receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        with start_server(
            trained_repository, "--workers", "1", env=env, log_path=tmp_path / "server.log"
        ) as server:
            with ClassifierClient(server.target, traceparent=tracing.new_traceparent()) as client:
                for _ in range(10):
                    client.classify(mnist_test_set[0][:1])
            server.stop()
        assert "TraceIdRatioBased{0.0}" in server.log()
        assert receiver.count() == 0


def test_tracing_works_with_tls_and_the_token(
    trained_repository, receiver, mnist_test_set, tmp_path
):
    ca = make_ca(tmp_path, "ca")
    server_files = issue(tmp_path, "server", ca, server=True)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    tls = ClientTls(ca=ca[0].cert)
    with start_server(
        trained_repository,
        *tls_args(server_files),
        *("--workers", "1", "--auth-token-file", str(token_file)),
        env=tracing_env(receiver),
        tls=tls,
        log_path=tmp_path / "server.log",
    ) as server:
        parent = tracing.new_traceparent()
        with ClassifierClient(
            server.target, tls=tls, token="s3cret-token", traceparent=parent
        ) as client:
            assert len(client.classify(mnist_test_set[0][:2]).labels) == 2
        check_call_trace(
            receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES)),
            parent,
            "mnist.v1.Classifier/Classify",
        )
        refused = tracing.new_traceparent()
        with ClassifierClient(server.target, tls=tls, traceparent=refused) as client:
            with pytest.raises(grpc.RpcError):
                client.classify(mnist_test_set[0][:1])
        spans = receiver.wait_for(in_trace(tracing.trace_id_of(refused)))
        call = next(s for s in spans if s.trace_id == tracing.trace_id_of(refused))
        assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_a_ratio_records_its_share_of_the_traces_started_here(
    trained_repository, mnist_test_set, tmp_path
):
    """--trace-sample-ratio 0.25 over 400 calls without a traceparent: about 100 traces, each whole
    (the server decides from the trace id as the SDK's sampler would, then hands it that id)."""
    with OtlpReceiver() as receiver:
        with opentelemetry_server(
            trained_repository,
            receiver,
            "--trace-sample-ratio",
            "0.25",
            log_path=tmp_path / "server.log",
        ) as server:
            with ClassifierClient(server.target) as client:
                for _ in range(400):
                    client.infer_kserve(mnist_test_set[0][:1])
            server.stop()
        spans = receiver.spans()
    roots = [s for s in spans if s.kind == SERVER_KIND]
    assert 60 <= len(roots) <= 140, len(roots)  # binomial(400, 0.25): 100 +- 4.6 sd
    for root in roots:
        assert root.parent_span_id == ""
        assert {s.name for s in spans if s.trace_id == root.trace_id} >= set(STAGES)


def test_otlp_over_http_is_exported_too(trained_repository, mnist_test_set, tmp_path):
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: the same spans, POSTed to /v1/traces."""
    with OtlpHttpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "mnist-test"}
        with opentelemetry_server(
            trained_repository, receiver, env=env, log_path=tmp_path / "server.log"
        ) as server:
            parent = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=parent) as client:
                client.classify(mnist_test_set[0][:1])
            spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
        assert "OTLP/HTTP" in server.log()
    check_call_trace(spans, parent, "mnist.v1.Classifier/Classify")
