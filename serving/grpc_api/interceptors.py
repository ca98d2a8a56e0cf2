"""The server's interceptor chain, in one place for the server and the in-process tests."""
from __future__ import annotations

import grpc

from serving.grpc_api.status import DomainErrorInterceptor
from serving.metrics import MetricsInterceptor


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Metrics outermost, so that it counts the status code the error mapping chose."""
    return [MetricsInterceptor(), DomainErrorInterceptor()]
