"""OpenTelemetry tracing of the server, all of it in this one module; off unless asked for.

Importing this module imports nothing of OpenTelemetry. `setup()` does, once per server process
(each `--workers` process after it was spawned, so every worker has its own exporter thread and
BatchSpanProcessor), and only when tracing is on. Every call site checks the one flag `on` before
it calls in here, so with tracing off a call pays that branch and nothing else; the gRPC and HTTP
server spans are wrappers added at registration, so off they cost nothing at all.

What a traced call looks like (W3C trace context from gRPC metadata or HTTP headers: a call with
a `traceparent` is its child, a call without one starts a trace):

    mnist.v1.Classifier/Classify (SERVER: rpc.*, model_name, model_version, status)
      decode                        the request's tensor or images to the model's input batch
      queue                         time in the batcher's queue; linked to the batch that ran it
      batch                         (in the trace of its first sampled call) batch.size images,
        onnxruntime.run             batch.requests calls, a link to every call's span

One batch computes many calls, so the batch span links to each call's span and each call's queue
span links to the batch span: from any call, a trace viewer finds the batch, its size and its
onnxruntime run. Configuration is the SDK's own environment variables (OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _PROTOCOL / _HEADERS / _CERTIFICATE, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER / _ARG, OTEL_BSP_*, OTEL_PROPAGATORS), plus the
flags of mnist-serve (--trace-mode, --trace-endpoint, --trace-sample-ratio), which win over them.

A call the sampler does not keep creates no span at all: for the samplers the SDK knows by name,
this module takes the same decision from the trace id itself (and hands a sampled root's id to the
SDK), since asking the SDK costs a whole span's creation per call. Measured with
bench/tracing_cost.py: see docs/tracing.md.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mnist-serve")

on = False  # the one flag every call site reads; True only after setup() turned tracing on

_tracer: Any = None
_provider: Any = None
# The sampler's decision, taken here where it is certain and cheap (serving.tracing._dropped):
# asking the SDK costs a span's creation even for a call it drops (about 0.1 ms a call on the 2
# shared cores this was measured on), which at 1 % would be paid by the other 99 %.
_parent_based = False  # parentbased_*: a caller's decision is followed
_root_always = True  # calls that start a trace: always_on (the SDK decides: it records them all)
_bound: int | None = None  # traceidratio: sampled when the trace id's low 64 bits are below it
_preset_trace_id: int | None = None  # the id a sampled root was decided with, for the SDK to use
_SERVER = None  # opentelemetry.trace.SpanKind.SERVER, once imported

# W3C trace context, https://www.w3.org/TR/trace-context/#traceparent-header
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")
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


@dataclass(frozen=True)
class TraceSettings:
    """What mnist-serve's flags say; None/empty: the OTEL_* variable, else the SDK's default."""

    mode: str = "auto"  # auto: on when OTEL_TRACES_EXPORTER names an exporter | off | opentelemetry
    endpoint: str = (
        ""  # OTLP receiver; "": OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else localhost:4317
    )
    sample_ratio: float | None = (
        None  # parentbased_traceidratio(r); None: OTEL_TRACES_SAMPLER[_ARG]
    )

    @classmethod
    def of(cls, config: Any) -> TraceSettings:
        """The tracing flags of a ServeConfig."""
        return cls(config.trace_mode, config.trace_endpoint, config.trace_sample_ratio)


def exporter_name(settings: TraceSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """Which exporter tracing would use, or None when tracing is off.

    `auto` follows the SDK's switch, OTEL_TRACES_EXPORTER, but only when it is set: the SDK's own
    default (otlp) would make every server that never asked for traces send them to localhost.
    """
    environ = os.environ if environ is None else environ
    if settings.mode == "off" or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named in ("", "none"):
        return "otlp" if settings.mode == "opentelemetry" else None
    if named not in EXPORTERS:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={named}: this server exports traces with otlp or console "
            "(or none for no traces)"
        )
    return named


def protocol(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    chosen = (
        (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        .strip()
        .lower()
    )
    if chosen not in PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={chosen}: choose grpc or http/protobuf")
    return chosen


def check_settings(settings: TraceSettings, environ: Mapping[str, str] | None = None) -> None:
    """Raise ValueError saying what is wrong, before anything starts (mnist-serve: one line)."""
    if settings.mode not in ("auto", "off", "opentelemetry"):
        raise ValueError("--trace-mode must be auto, off or opentelemetry")
    if settings.sample_ratio is not None and not 0.0 <= settings.sample_ratio <= 1.0:
        raise ValueError(f"--trace-sample-ratio must be in [0, 1], not {settings.sample_ratio:g}")
    if exporter_name(settings, environ) == "otlp":
        protocol(environ)


def setup(settings: TraceSettings, worker: int | None = None) -> bool:
    """Turn tracing on in this process when the settings ask for it; True when they did."""
    global on, _tracer, _provider, _SERVER
    exporter = exporter_name(settings)
    if exporter is None or on:
        return on
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

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
    resource = Resource.create(attributes)
    # None: the SDK reads OTEL_TRACES_SAMPLER / _ARG (its default: parentbased_always_on).
    sampler = (
        None if settings.sample_ratio is None else ParentBasedTraceIdRatio(settings.sample_ratio)
    )
    provider = TracerProvider(resource=resource, sampler=sampler, id_generator=_id_generator())
    _known_sampler(settings)
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
        where = "the console"
    else:
        span_exporter, where = _otlp_exporter(settings.endpoint)
    # Spans leave in batches from the processor's own thread (OTEL_BSP_* sizes it): a call only
    # queues its finished spans, and a full queue drops spans, never calls.
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _provider, _tracer, _SERVER = (
        provider,
        provider.get_tracer("mnist-serve", __version__),
        trace.SpanKind.SERVER,
    )
    on = True
    log.info(
        "tracing: OpenTelemetry spans to %s, sampler %s", where, provider.sampler.get_description()
    )
    return True


def _known_sampler(settings: TraceSettings) -> None:
    """What the configured sampler decides, as the SDK builds it from the flag or OTEL_* values."""
    global _parent_based, _root_always, _bound
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    if settings.sample_ratio is not None:
        name, ratio = "parentbased_traceidratio", str(settings.sample_ratio)
    else:
        name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    _parent_based = name.startswith("parentbased_")
    root = name.removeprefix("parentbased_")
    _root_always, _bound = root == "always_on", None
    if root == "always_off":
        _bound = 0
    elif root == "traceidratio":
        try:
            rate = float(ratio)
        except ValueError:  # the SDK uses 1.0 then (and says so)
            rate = 1.0
        _bound = TraceIdRatioBased.get_bound_for_rate(rate)
    elif root != "always_on":  # a sampler this module does not know: the SDK decides every call
        _parent_based, _root_always = False, True


def _dropped(parent: Any) -> bool:
    """Whether a call with this extracted context goes unsampled; for a sampled call that starts a
    trace, the trace id it was decided with is left for the SDK's id generator (_PresetIds)."""
    global _preset_trace_id
    if _root_always and not _parent_based:
        return False
    from opentelemetry import trace

    caller = trace.get_current_span(parent).get_span_context()
    if caller.is_valid:
        if _parent_based:
            return not caller.trace_flags.sampled
        return _bound is not None and (caller.trace_id & _LOW_64) >= _bound
    if _root_always:
        return False
    trace_id = _random.getrandbits(128) or 1
    if (trace_id & _LOW_64) >= _bound:
        return True
    _preset_trace_id = trace_id  # no await before the SDK's start_span takes it
    return False


_LOW_64 = (1 << 64) - 1
_random = random.Random()


def _id_generator() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _PresetIds(RandomIdGenerator):
        """The SDK's random ids, except a trace id already drawn (and sampled) by _dropped."""

        def generate_trace_id(self) -> int:
            global _preset_trace_id
            preset, _preset_trace_id = _preset_trace_id, None
            return preset if preset is not None else super().generate_trace_id()

    return _PresetIds()


def _otlp_exporter(endpoint: str) -> tuple[Any, str]:
    if protocol() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=endpoint or None)
        return exporter, f"OTLP/HTTP {exporter._endpoint}"
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint or None)
    return exporter, f"OTLP/gRPC {exporter._endpoint}"


def shutdown() -> None:
    """Export what is left and stop the exporter (a server calls it once it stopped)."""
    global on
    if _provider is not None and on:
        on = False
        _provider.shutdown()


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
        if _dropped(parent):  # known unsampled: no span at all (the SDK's decision costs more)
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
        if _dropped(parent):
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


# ---- outgoing calls (the clients): nothing of OpenTelemetry needed ------------------------------


def new_traceparent(sampled: bool = True) -> str:
    """A fresh W3C traceparent: a new trace id and parent id (random), sampled unless told not."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{'01' if sampled else '00'}"


def check_traceparent(value: str) -> str:
    """`value` when it is a valid W3C traceparent, else ValueError saying what one looks like."""
    found = _TRACEPARENT.match(value.strip())
    if (
        found is None
        or found.group(1) == "ff"
        or set(found.group(2)) == {"0"}
        or set(found.group(3)) == {"0"}
    ):
        raise ValueError(
            f"{value!r} is not a W3C traceparent: expected 00-<32 hex trace id>-<16 hex parent "
            "id>-<2 hex flags>, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 "
            "(ids not all zeros)"
        )
    return value.strip()


def trace_id_of(traceparent: str) -> str:
    return check_traceparent(traceparent).split("-")[1]


TraceHeader = str | Callable[[], str] | None  # a fixed traceparent, or one made for each call


def outgoing(
    traceparent: TraceHeader, tracestate: str | None = None
) -> Callable[[], list[tuple[str, str]]] | None:
    """The trace headers a client adds to each call, as a function of no arguments; None: none."""
    if traceparent is None:
        return None
    if isinstance(traceparent, str):
        fixed = [("traceparent", check_traceparent(traceparent))]
        if tracestate:
            fixed.append(("tracestate", tracestate))
        return lambda: fixed
    state = [("tracestate", tracestate)] if tracestate else []
    return lambda: [("traceparent", traceparent()), *state]
