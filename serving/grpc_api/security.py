"""The gRPC port's side of transport security (serving.security): certificates and the token check.

- TLS: gRPC asks for the current certificate on each new connection (its dynamic certificate
  configuration); the answer comes from the watched files, None while they are unchanged.
- Tokens: `token_checked` wraps each protected method (serving.grpc_api.handlers) inside the error
  mapping, so a refusal gets its status code (UNAUTHENTICATED) there and is counted like any call.
"""

from __future__ import annotations

import grpc

from serving.security import TlsFiles, TokenFile, WatchedFiles, bearer_token

# Methods that stay open with --auth-token-file: liveness and readiness, as probes call them.
OPEN_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
    }
)
# Services whose every other method needs the token: inference and model description/control.
PROTECTED_SERVICES = ("/mnist.v1.Classifier/", "/inference.GRPCInferenceService/")
HOW_TO_SEND = "the metadata 'authorization: Bearer <token>'"


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (mTLS when files.client_ca is set) credentials that follow the files when they change."""

    def configuration() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = files.load()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    watched = WatchedFiles(files.paths, configuration, "TLS certificate")

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        new, changed = watched.current()
        return new if changed else None  # None: gRPC keeps the configuration it has

    return grpc.dynamic_ssl_server_credentials(
        watched.current()[0], fetch, require_client_authentication=files.client_ca is not None
    )


def needs_token(method: str) -> bool:
    return method.startswith(PROTECTED_SERVICES) and method not in OPEN_METHODS


def token_checked(handler: grpc.RpcMethodHandler, token: TokenFile) -> grpc.RpcMethodHandler:
    """`handler` refusing calls without the right bearer token (Unauthenticated)."""
    behaviour = handler.unary_unary

    async def guarded(request, context: grpc.aio.ServicerContext):
        token.check(bearer_token(context.invocation_metadata()), HOW_TO_SEND)
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
