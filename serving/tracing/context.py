"""Trace context for outgoing calls (the clients): W3C traceparent headers, no OpenTelemetry.

A client given a traceparent (a fixed one, or a function that makes one per call, e.g.
new_traceparent) adds it to every call, so the server's spans join the caller's trace.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

# W3C trace context, https://www.w3.org/TR/trace-context/#traceparent-header
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


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
