"""What tracing is configured to do: mnist-serve's flags over the SDK's OTEL_* variables.

Configuration is the SDK's own environment variables (OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _PROTOCOL / _HEADERS / _CERTIFICATE, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER / _ARG, OTEL_BSP_*, OTEL_PROPAGATORS), plus the
flags of mnist-serve (--trace-mode, --trace-endpoint, --trace-sample-ratio), which win over them.
Nothing here imports OpenTelemetry until an exporter is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True)
class TraceSettings:
    """What mnist-serve's flags say; None/empty: the OTEL_* variable, else the SDK's default."""

    mode: str = "auto"  # auto: on when OTEL_TRACES_EXPORTER names an exporter | off | opentelemetry
    # OTLP receiver; "": OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else localhost:4317
    endpoint: str = ""
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


def span_exporter(exporter: str, endpoint: str) -> tuple[Any, str]:
    """The SDK's span exporter that `exporter` names, and where it sends spans (for the log)."""
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), "the console"
    if protocol() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        otlp = HttpExporter(endpoint=endpoint or None)
        return otlp, f"OTLP/HTTP {otlp._endpoint}"
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = OTLPSpanExporter(endpoint=endpoint or None)
    return otlp, f"OTLP/gRPC {otlp._endpoint}"
