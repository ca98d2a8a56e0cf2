"""Domain errors to HTTP status codes: the one place where that mapping lives for REST.

The handlers raise the model core's errors (serving.inference.errors) and never choose a
code; the middleware in serving.http_api.app answers them as the protocol's
`{"error": "<message>"}` with the code from HTTP_STATUS. gRPC has its own table
(serving.grpc_api.status) for the same errors.
"""
from __future__ import annotations

from serving.inference.errors import (
    DeadlinePassed,
    InvalidInput,
    ModelControlDisabled,
    ModelLoadFailed,
    QueueFull,
    ServingError,
    ShuttingDown,
    Unauthenticated,
    UnknownModel,
    UnknownVersion,
)

HTTP_STATUS: dict[type[ServingError], int] = {
    UnknownModel: 404,
    UnknownVersion: 404,
    InvalidInput: 400,
    QueueFull: 429,  # Too Many Requests: retry with backoff
    DeadlinePassed: 504,  # the request's own timeout passed while it was queued
    ShuttingDown: 503,  # Service Unavailable: clients retry on another replica
    ModelControlDisabled: 503,  # Triton's answer to load/unload outside explicit mode
    ModelLoadFailed: 500,
    Unauthenticated: 401,  # --auth-token-file: no or wrong bearer token
}


def status_for(error: ServingError) -> int:
    """The code for `error`: its own class's, else the nearest base class's, else 500."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
