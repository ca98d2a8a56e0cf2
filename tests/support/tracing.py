"""Fixtures and helpers of the tracing tests: an OTLP receiver on loopback (bench/otlp_sink.py),
a traced server, and the shape every inference call's trace has.

Registered as a plugin in tests/conftest.py."""

from __future__ import annotations

import pytest

from bench.otlp_sink import OtlpReceiver, ReceivedSpan
from serving import tracing
from serving.process import start_server

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


STAGES = ("decode", "queue", "batch", "onnxruntime.run")


def tracing_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """The standard OTEL_* variables pointing a server at `receiver`; spans leave every 100 ms."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "mnist-test",
        **extra,
    }


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced_server(trained_repository, receiver, tmp_path_factory):
    log = tmp_path_factory.mktemp("traced") / "server.log"
    with start_server(
        trained_repository, "--workers", "1", env=tracing_env(receiver), log_path=log
    ) as running:
        yield running


def parent_id(traceparent: str) -> str:
    return traceparent.split("-")[2]


def in_trace(trace_id: str, names: tuple[str, ...] = ()) -> callable:
    """A receiver condition: a server span of `trace_id` and, under it, the stage spans."""

    def holds(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return any(s.kind == SERVER_KIND for s in mine) and all(
            any(s.name == n for s in mine) for n in names
        )

    return holds


def check_call_trace(spans: list[ReceivedSpan], traceparent: str, server_name: str) -> ReceivedSpan:
    """The shape every inference call's trace has; returns its server span."""
    trace_id = tracing.trace_id_of(traceparent)
    mine = [s for s in spans if s.trace_id == trace_id]
    servers = [s for s in mine if s.kind == SERVER_KIND and s.name == server_name]
    assert len(servers) == 1, [(s.name, s.kind) for s in mine]
    call = servers[0]
    assert call.parent_span_id == parent_id(traceparent)  # the caller's span is its parent
    assert call.attributes["model_name"] == "mnist" and call.attributes["model_version"] == "1"
    assert call.resource["service.name"] == "mnist-test"  # OTEL_SERVICE_NAME
    children = {s.name: s for s in mine if s.parent_span_id == call.span_id}
    assert {"decode", "queue"} <= set(children), sorted(children)
    batch = next(
        s for s in spans if s.name == "batch" and any(link[1] == call.span_id for link in s.links)
    )
    assert batch.attributes["batch.size"] >= 1 and batch.attributes["batch.requests"] >= 1
    queue = children["queue"]
    assert [(link[0], link[1]) for link in queue.links] == [(batch.trace_id, batch.span_id)]
    assert queue.start_ns <= queue.end_ns <= batch.end_ns
    runs = [s for s in spans if s.name == "onnxruntime.run" and s.parent_span_id == batch.span_id]
    assert len(runs) == 1 and runs[0].attributes["batch.size"] == batch.attributes["batch.size"]
    assert runs[0].attributes["onnxruntime.provider"].endswith("ExecutionProvider")
    return call


def opentelemetry_server(
    repository, receiver, *extra_args: str, log_path, env: dict[str, str] | None = None
):
    """One worker exporting to `receiver` by the flags (--trace-mode, --trace-endpoint) rather
    than OTEL_* variables; spans leave every 100 ms."""
    return start_server(
        repository,
        "--workers",
        "1",
        "--trace-mode",
        "opentelemetry",
        "--trace-endpoint",
        receiver.endpoint,
        *extra_args,
        env={"OTEL_BSP_SCHEDULE_DELAY": "100", **(env or {})},
        log_path=log_path,
    )
