"""What every unary method does around its servicer, attached once, when the services are registered.

Outermost first: with tracing on, a server span (serving.tracing); count and time the call
(serving.metrics), turn a domain error or a malformed request into its status code
(serving.grpc_api.status), check the bearer token with --auth-token-file
(serving.grpc_api.security). So the token's refusal is mapped like any error, and the metrics
count the code the mapping chose.

gRPC's server interceptors would do the same, but gRPC awaits every interceptor on every call just
to look the handler up, and each had to cache its wrapper by method name. Here the generated
`add_*_to_server` functions register through a `WrappingRegistrar`, which wraps each method's
handler once; a call then finds its wrapped handler in gRPC's own tables. (Measured at 32 callers
x 1 image: the interceptor chain cost about 5 % of the server's throughput.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

from serving import metrics, tracing
from serving.grpc_api import status
from serving.grpc_api.security import needs_token, token_checked
from serving.security import TokenFile

Wrap = Callable[
    [str, grpc.RpcMethodHandler], grpc.RpcMethodHandler
]  # (full method name, handler) -> handler


def server_wrap(token: TokenFile | None = None) -> Wrap:
    """The server's wrapping of each unary method: metrics(errors(token check(servicer)))."""

    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:  # reflection's stream: nothing here applies to it
            return handler
        if token is not None and needs_token(method):
            handler = token_checked(handler, token)
        handler = metrics.timed(status.mapping_errors(handler, method), method)
        # Outermost, added only with tracing on: the span covers the token check and metrics too.
        if tracing.on and not method.startswith(tracing.UNTRACED_SERVICES):
            handler = tracing.traced_grpc(method, handler)
        return handler

    return wrap


class WrappingRegistrar:
    """Stands in for the server in the generated `add_*_to_server(servicer, server)` functions."""

    def __init__(self, server: grpc.aio.Server, wrap: Wrap) -> None:
        self._server = server
        self._wrap = wrap

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedLookup(h, self._wrap) for h in generic_handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        # gRPC looks these up first; the generic handlers above answer for the same methods otherwise.
        self._server.add_registered_method_handlers(
            service,
            {name: self._wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()},
        )


class _WrappedLookup(grpc.GenericRpcHandler):
    """A generic handler whose answers come wrapped, each method's wrapped once."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[
            str, grpc.RpcMethodHandler
        ] = {}  # only methods that exist: a client names any

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped
