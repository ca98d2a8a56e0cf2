"""OpenTelemetry tracing of the server; off unless asked for. The one name call sites import.

Importing this package imports nothing of OpenTelemetry. `setup()` does, once per server process
(each `--workers` process after it was spawned, so every worker has its own exporter thread and
BatchSpanProcessor), and only when tracing is on. Every call site checks the one flag `on` before
it calls in here, so with tracing off a call pays that branch and nothing else; the gRPC and HTTP
server spans are wrappers added at registration, so off they cost nothing at all.

Its parts, each re-exported here:

- serving.tracing.settings: what the flags and the OTEL_* variables ask for, and the exporter;
- serving.tracing.sampling: the sampler's decision, taken before any span exists (cheap);
- serving.tracing.spans: the server span per transport, the stages of a call, a batch's links;
- serving.tracing.context: W3C traceparent headers for the clients (no OpenTelemetry).

Measured with bench/tracing_cost.py: see docs/tracing.md.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from serving.tracing import sampling, spans
from serving.tracing.context import (
    TraceHeader,
    check_traceparent,
    new_traceparent,
    outgoing,
    trace_id_of,
)
from serving.tracing.settings import (
    EXPORTERS,
    PROTOCOLS,
    TraceSettings,
    check_settings,
    exporter_name,
    protocol,
    span_exporter,
)
from serving.tracing.spans import (
    UNTRACED_PATHS,
    UNTRACED_SERVICES,
    BatchTrace,
    annotate_model,
    child,
    current_ids,
    http_middleware,
    queued,
    stage,
    start_batch,
    traced_grpc,
)

__all__ = [
    "EXPORTERS",
    "PROTOCOLS",
    "UNTRACED_PATHS",
    "UNTRACED_SERVICES",
    "BatchTrace",
    "TraceHeader",
    "TraceSettings",
    "annotate_model",
    "check_settings",
    "check_traceparent",
    "child",
    "current_ids",
    "exporter_name",
    "http_middleware",
    "new_traceparent",
    "on",
    "outgoing",
    "protocol",
    "queued",
    "setup",
    "shutdown",
    "stage",
    "start_batch",
    "trace_id_of",
    "traced_grpc",
]

log = logging.getLogger("mnist-serve")

on = False  # the one flag every call site reads; True only after setup() turned tracing on

_provider: Any = None


def setup(settings: TraceSettings, worker: int | None = None) -> bool:
    """Turn tracing on in this process when the settings ask for it; True when they did."""
    global on, _provider
    exporter = exporter_name(settings)
    if exporter is None or on:
        return on
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from serving import __version__

    # None: the SDK reads OTEL_TRACES_SAMPLER / _ARG (its default: parentbased_always_on).
    sampler = (
        None if settings.sample_ratio is None else ParentBasedTraceIdRatio(settings.sample_ratio)
    )
    provider = TracerProvider(
        resource=_resource(worker), sampler=sampler, id_generator=sampling.id_generator()
    )
    sampling.follow(settings)
    exported, where = span_exporter(exporter, settings.endpoint)
    # Spans leave in batches from the processor's own thread (OTEL_BSP_* sizes it): a call only
    # queues its finished spans, and a full queue drops spans, never calls.
    provider.add_span_processor(BatchSpanProcessor(exported))
    trace.set_tracer_provider(provider)
    _provider = provider
    spans.use(provider.get_tracer("mnist-serve", __version__), trace.SpanKind.SERVER)
    on = True
    log.info(
        "tracing: OpenTelemetry spans to %s, sampler %s", where, provider.sampler.get_description()
    )
    return True


def _resource(worker: int | None) -> Any:
    """Who sends the spans: this server process (and its worker number under --workers)."""
    from opentelemetry.sdk.resources import Resource

    from serving import __version__

    attributes: dict[str, Any] = {
        "service.version": __version__,
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        "process.pid": os.getpid(),
    }
    if worker is not None:
        attributes["mnist.worker"] = worker
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "mnist-serve"  # OTEL_SERVICE_NAME, when set, names it instead
    return Resource.create(attributes)


def shutdown() -> None:
    """Export what is left and stop the exporter (a server calls it once it stopped)."""
    global on
    if _provider is not None and on:
        on = False
        _provider.shutdown()
