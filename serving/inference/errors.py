"""What can go wrong with a prediction, whatever the transport.

The model core raises these; each transport maps them to its own status codes in one place
(gRPC: serving.grpc_api.status). The message is written for the caller and says what to do.
Every message is bounded (MESSAGE_LIMIT bytes): gRPC carries it in a trailer, and a message
that echoed a 1 MiB field would break the call itself (the client would see "metadata size
exceeds hard limit" instead of the real error). Client-supplied strings go through quoted(),
which cuts them short and says so.
"""
from __future__ import annotations

from collections.abc import Sequence

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
