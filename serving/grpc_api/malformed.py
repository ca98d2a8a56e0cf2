"""Requests whose bytes are not the method's protobuf message, refused in a few words.

A request that is not valid protobuf never reaches a servicer: the method's deserializer, wrapped
by `tolerant`, turns it into a MalformedRequest, which serving.grpc_api.status answers
INVALID_ARGUMENT and the metrics count like any call. gRPC's own handling would answer UNKNOWN
and log a traceback per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.log_limit import OncePerInterval

LOG_INTERVAL = 60.0  # seconds: at most one log line per interval about malformed requests
_LOGGED = OncePerInterval(LOG_INTERVAL, logging.getLogger("mnist-serve"))


@dataclass(frozen=True)
class MalformedRequest:
    """What the deserializer hands on when the request's bytes are not the method's message."""

    size: int  # bytes received

    @property
    def message(self) -> str:
        return f"the request ({self.size} bytes) is not a valid protobuf message for this method"


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning a MalformedRequest where it would raise."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001  (protobuf's DecodeError, or whatever a parser raises)
            return MalformedRequest(len(data))

    return deserialize


def note(request: MalformedRequest, method: str) -> None:
    """Log the refusal, at most once per LOG_INTERVAL (a client can send junk on every call)."""
    _LOGGED.note(f"malformed protobuf request on {method} ({request.size} bytes): INVALID_ARGUMENT")
