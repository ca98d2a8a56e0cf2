"""Domain errors to gRPC status codes: the one place where that mapping lives.

The servicers raise the model core's errors (serving.inference.errors) and never choose a
status code; the interceptor below catches them and aborts the call with the code from
GRPC_STATUS and the error's own message. Another transport (HTTP) keeps a table of its own
for the same errors.
"""
from __future__ import annotations

import grpc

from serving.inference.errors import (
    DeadlinePassed,
    InvalidInput,
    QueueFull,
    ServingError,
    ShuttingDown,
    UnknownModel,
    UnknownVersion,
)

GRPC_STATUS: dict[type[ServingError], grpc.StatusCode] = {
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    UnknownVersion: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,  # retry with backoff
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,  # clients retry on another replica
}


def status_for(error: ServingError) -> grpc.StatusCode:
    """The code for `error`: its own class's, else the nearest base class's, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns a ServingError raised by any unary method into its status code and message."""

    def __init__(self) -> None:
        # gRPC asks for the handler on every call; the wrapper is built once per method.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        self._handlers[method] = _mapping_errors(handler)
        return self._handlers[method]


def _mapping_errors(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    behaviour = handler.unary_unary

    async def mapped(request, context: grpc.aio.ServicerContext):
        try:
            return await behaviour(request, context)
        except ServingError as error:
            await context.abort(status_for(error), str(error))

    return grpc.unary_unary_rpc_method_handler(
        mapped, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
