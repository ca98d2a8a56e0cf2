"""The server's interceptor chain, in one place for the server and the in-process tests."""
from __future__ import annotations

import grpc

from serving.grpc_api.status import DomainErrorInterceptor
from serving.metrics import MetricsInterceptor
from serving.security import TokenAuthInterceptor, TokenFile


def server_interceptors(token: TokenFile | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Metrics outermost, so that it counts the status code the error mapping chose; the token check
    (with --auth-token-file) innermost, so that its refusal is mapped and counted like any error."""
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(), DomainErrorInterceptor()]
    if token is not None:
        chain.append(TokenAuthInterceptor(token))
    return chain
