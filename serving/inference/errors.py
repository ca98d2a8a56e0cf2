"""What can go wrong with a prediction, whatever the transport.

The model core raises these; STATUS_CODES below gives each one its gRPC and its HTTP code, in one
table that both transports read (serving.grpc_api.status, serving.http_api.status), so the two
cannot disagree. The message is written for the caller and says what to do.
Every message is bounded (MESSAGE_LIMIT bytes): gRPC carries it in a trailer, and a message
that echoed a 1 MiB field would break the call itself (the client would see "metadata size
exceeds hard limit" instead of the real error). Client-supplied strings go through quoted(),
which cuts them short and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MESSAGE_LIMIT = 512  # bytes of UTF-8; far under gRPC's 8 KiB metadata budget
QUOTE_LIMIT = 64  # characters of a client-supplied string shown in a message


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """`message` if it fits in `limit` UTF-8 bytes, else its start and a mark saying it was cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    mark = f"… [cut, {len(data):,} bytes]"
    return data[: limit - len(mark.encode())].decode("utf-8", "ignore") + mark


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied string for a message: quoted, and cut with a mark when long."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… [cut, {len(text):,} chars]"


def shown_dims(dims: Sequence[int], limit: int = 8) -> str:
    """A client-supplied shape for a message: its first dims, cut with a mark when long."""
    if len(dims) <= limit:
        return str([int(d) for d in dims])
    head = ", ".join(str(int(d)) for d in dims[:limit])
    return f"[{head}, …] [cut, {len(dims):,} dims]"


class ServingError(Exception):
    """A request the model core cannot answer; the message says why and what to do."""

    def __init__(self, message: str = "") -> None:
        super().__init__(bounded(message))


class UnknownModel(ServingError):
    """The request names a model this server does not serve."""


class UnknownVersion(ServingError):
    """The request names a version of the model that is not served."""


class InvalidInput(ServingError, ValueError):
    """A request field that cannot become model input; the message says how to fix it."""


class QueueFull(ServingError):
    """The queue holds --max-queue-size requests already: shed load rather than queue forever."""


class DeadlinePassed(ServingError):
    """The caller's deadline passed while its request waited in the queue."""


class ShuttingDown(ServingError):
    """The server is draining and takes no new work."""


class Unauthenticated(ServingError):
    """The call carries no bearer token, or the wrong one (--auth-token-file)."""


class ModelControlDisabled(ServingError):
    """A load or unload request while --model-control-mode is not `explicit`."""


class ModelLoadFailed(ServingError):
    """An explicit load request whose model has no version that passes the checks."""


@dataclass(frozen=True)
class Codes:
    """What a transport answers for an error: a gRPC status code's name and an HTTP status."""

    grpc: str  # a grpc.StatusCode member's name: the model core imports no gRPC
    http: int


# The one table: every domain error above has its row (tests/test_architecture.py walks the
# hierarchy). The HTTP codes follow KServe's and Triton's REST answers for the same errors.
STATUS_CODES: dict[type[ServingError], Codes] = {
    UnknownModel: Codes("NOT_FOUND", 404),
    UnknownVersion: Codes("NOT_FOUND", 404),
    InvalidInput: Codes("INVALID_ARGUMENT", 400),
    QueueFull: Codes("RESOURCE_EXHAUSTED", 429),  # retry with backoff (429: Too Many Requests)
    # The caller's deadline (gRPC) or the request's own timeout (REST) passed while it was queued.
    DeadlinePassed: Codes("DEADLINE_EXCEEDED", 504),
    ShuttingDown: Codes("UNAVAILABLE", 503),  # clients retry on another replica
    ModelControlDisabled: Codes("UNAVAILABLE", 503),  # Triton's answer outside explicit mode
    ModelLoadFailed: Codes("INTERNAL", 500),  # Triton's code for a model that fails to load
    Unauthenticated: Codes("UNAUTHENTICATED", 401),  # --auth-token-file: no or wrong token
}
UNMAPPED = Codes("INTERNAL", 500)  # an error without a row: never OK, never hidden


def codes_for(error: ServingError) -> Codes:
    """The codes for `error`: its own class's row, else the nearest base class's, else UNMAPPED."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return UNMAPPED
