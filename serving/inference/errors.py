"""What can go wrong with a prediction, whatever the transport.

The model core raises these; each transport maps them to its own status codes in one place
(gRPC: serving.grpc_api.status). The message is written for the caller and says what to do.
"""
from __future__ import annotations


class ServingError(Exception):
    """A request the model core cannot answer; the message says why and what to do."""


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

