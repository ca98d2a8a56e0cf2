"""The spans of a traced call: the server span per transport, its stages, and its batch.

What a traced call looks like (W3C trace context from gRPC metadata or HTTP headers: a call with
a `traceparent` is its child, a call without one starts a trace):

    mnist.v1.Classifier/Classify (SERVER: rpc.*, model_name, model_version, status)
      decode                        the request's tensor or images to the model's input batch
      queue                         time in the batcher's queue; linked to the batch that ran it
      batch                         (in the trace of its first sampled call) batch.size images,
        onnxruntime.run             batch.requests calls, a link to every call's span

One batch computes many calls, so the batch span links to each call's span and each call's queue
span links to the batch span: from any call, a trace viewer finds the batch, its size and its
onnxruntime run. The gRPC and HTTP server spans are wrappers added at registration, so with
tracing off they cost nothing at all; the rest is called only when serving.tracing.on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serving.tracing import sampling

_tracer: Any = None  # the SDK's tracer, once serving.tracing.setup() made one
_SERVER = None  # opentelemetry.trace.SpanKind.SERVER, once imported

# Not traced: probes call these every few seconds and would bury the calls worth looking at.
UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNTRACED_PATHS = ("/v2/health/",)
# Server-side gRPC codes that mean the server failed (OpenTelemetry's RPC conventions); the others
# (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's and leave the span's status unset.
_SERVER_FAULTS = (
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
)


def use(tracer: Any, server_kind: Any) -> None:
    """Start spans with this tracer (serving.tracing.setup hands it over)."""
    global _tracer, _SERVER
    _tracer, _SERVER = tracer, server_kind


# ---- incoming calls: the server spans --------------------------------------------------------


def traced_grpc(method: str, handler: Any) -> Any:
    """`handler` inside a SERVER span named after the method, child of the caller's traceparent."""
    import grpc
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Status, StatusCode

    behaviour = handler.unary_unary
    service, _, name = method.strip("/").rpartition("/")
    base = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    async def traced(request, context):
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        if sampling.dropped(
            parent
        ):  # known unsampled: no span at all (the SDK's decision costs more)
            return await behaviour(request, context)
        span = _tracer.start_span(method.strip("/"), context=parent, kind=_SERVER, attributes=base)
        if not span.is_recording():
            return await behaviour(request, context)
        token = otel_context.attach(trace.set_span_in_context(span))
        response, failed = None, True
        try:
            response = await behaviour(request, context)
            failed = False
            return response
        except BaseException as error:
            span.record_exception(error)
            raise
        finally:
            otel_context.detach(token)
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            if not isinstance(code, grpc.StatusCode):  # an int code set by hand
                code = next(
                    (c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN
                )
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code.name in _SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, context.details() or code.name))
            _model_attributes(span, response, request)
            span.end()

    return grpc.unary_unary_rpc_method_handler(
        traced,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _model_attributes(span: Any, response: Any, request: Any) -> None:
    """The model and version that answered (from the answer), else the ones asked for."""
    for source in (response, request):
        name = getattr(source, "model_name", None)
        if name is None:
            name = getattr(source, "name", None)  # KServe's ModelReady, ModelMetadata
        if isinstance(name, str) and name:
            span.set_attribute("model_name", name)
            version = getattr(source, "model_version", getattr(source, "version", ""))
            if isinstance(version, str) and version:
                span.set_attribute("model_version", version)
            return


def http_middleware() -> Callable:
    """An aiohttp middleware: a SERVER span around every call, child of the caller's traceparent."""
    from aiohttp import web
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Status, StatusCode

    @web.middleware
    async def traced(request, handler):
        if request.path.startswith(UNTRACED_PATHS):
            return await handler(request)
        parent = propagate.extract(request.headers)
        if sampling.dropped(parent):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        attributes = {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
        }
        span = _tracer.start_span(
            f"{request.method} {route}", context=parent, kind=_SERVER, attributes=attributes
        )
        if not span.is_recording():
            return await handler(request)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response
        except BaseException as error:
            span.record_exception(error)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    return traced


def annotate_model(name: str, version: str) -> None:
    """Name the model and version that computed the call on the current (server) span."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("model_name", name)
        span.set_attribute("model_version", version)


# ---- the stages of a call ----------------------------------------------------------------------


def stage(name: str, **attributes: Any) -> Any:
    """A child span of the current span (e.g. decode), as a context manager; nothing when the
    call is not recorded."""
    return child(name, attributes)


def child(name: str, attributes: Mapping[str, Any]) -> Any:
    """A child span of the current span when one is being recorded, else nothing (onnxruntime's
    warm-up runs outside any call and starts no trace)."""
    from contextlib import nullcontext

    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


def queued() -> tuple[Any, int] | None:
    """What the batcher keeps of a call it queues: the call's span context and the time (ns), or
    None when the call is not sampled (it then gets no queue span, and no batch span for it)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return (context, time.time_ns()) if context.trace_flags.sampled else None


class BatchTrace:
    """One batch's spans: `batch` (links to its calls), a `queue` span per call (linked to it)."""

    def __init__(self, calls: Sequence[tuple[Any, int]], images: int) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Link, NonRecordingSpan

        self._trace = trace
        started = time.time_ns()
        parent = trace.set_span_in_context(NonRecordingSpan(calls[0][0]))
        self.span = _tracer.start_span(
            "batch",
            context=parent,
            start_time=started,
            links=[Link(context) for context, _ in calls],
            attributes={"batch.size": images, "batch.requests": len(calls)},
        )
        link = [Link(self.span.get_span_context(), {"batch.size": images})]
        for context, enqueued in calls:
            queue = _tracer.start_span(
                "queue",
                context=trace.set_span_in_context(NonRecordingSpan(context)),
                start_time=min(enqueued, started),
                links=link,
            )
            queue.end(end_time=started)
        self._context = trace.set_span_in_context(self.span)

    def run(self, function: Callable[[Any], Any], argument: Any) -> Any:
        """function(argument) with the batch span current, on whichever thread calls this."""
        from opentelemetry import context as otel_context

        token = otel_context.attach(self._context)
        try:
            return function(argument)
        finally:
            otel_context.detach(token)

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
        self.span.end()


def start_batch(calls: Sequence[tuple[Any, int] | None], images: int) -> BatchTrace | None:
    """The batch's spans, when at least one of its calls is sampled; None otherwise (no spans)."""
    sampled = [call for call in calls if call is not None]
    return BatchTrace(sampled, images) if sampled else None


# ---- logs -------------------------------------------------------------------------------------


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids (hex), for log records; None outside any span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
