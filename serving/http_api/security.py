"""The HTTP port's side of transport security (serving.security): HTTPS and the token middleware.

The same --tls-cert/--tls-key/--tls-client-ca files and the same token rule as the gRPC port
(serving.grpc_api.security); a refusal is Unauthenticated, answered 401 from the error table.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from serving.security import TlsFiles, TokenFile, WatchedFiles, bearer_token

# HTTP paths that stay open with --auth-token-file: health, the page itself, and a model's readiness.
OPEN_HTTP_PREFIXES = ("/v2/health/", "/static/")
OPEN_HTTP_PATHS = frozenset({"/", "/favicon.ico"})
HOW_TO_SEND = "the header 'Authorization: Bearer <token>'"


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSLContext for the HTTP port that follows the files: each new handshake gets the newest."""

    def pick_newest(sock: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        # Called during every handshake: swapping the socket's context is how Python serves a new
        # certificate.
        sock.context = watched.current()[0]

    def build() -> ssl.SSLContext:
        files.load()  # a missing or empty file named in one clear line
        context = files.ssl_context()
        context.sni_callback = pick_newest
        return context

    watched = WatchedFiles(files.paths, build, "TLS certificate for HTTP")
    return watched.current()[0]


def needs_token(path: str) -> bool:
    if path in OPEN_HTTP_PATHS or path.startswith(OPEN_HTTP_PREFIXES):
        return False
    return not (path.startswith("/v2/models/") and path.endswith("/ready"))


def token_middleware(token: TokenFile):
    """The REST port's token check, inside the error answers (serving.http_api.app)."""

    @web.middleware
    async def check_token(request, handler):
        if needs_token(request.path):
            token.check(bearer_token(list(request.headers.items())), HOW_TO_SEND)
        return await handler(request)

    return check_token
