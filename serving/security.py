"""Transport security: TLS and mutual TLS on the server's ports, and bearer-token auth.

- TLS (--tls-cert, --tls-key): the gRPC port serves TLS with these PEM files. They are re-read
  when they change (a renewed certificate, e.g. cert-manager rewriting a Kubernetes Secret):
  gRPC asks for the current certificate on each new connection (its dynamic certificate
  configuration), and we answer from the files' last-seen state. Connections already open keep
  the certificate they were made with.
- mTLS (--tls-client-ca): every client must present a certificate signed by that CA; one without
  a certificate, with a certificate from another CA, or with an expired one never gets a
  connection (the handshake fails: UNAVAILABLE on the client).
- Tokens (--auth-token-file): inference and model calls must carry "authorization: Bearer <token>"
  (UNAUTHENTICATED otherwise). grpc.health.v1, reflection, KServe's ServerLive/ServerReady/
  ModelReady and /metrics stay open, so probes and scrapers need no secret. The file is re-read
  when it changes, so a token rotates without a restart.
"""
from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.inference.errors import Unauthenticated

log = logging.getLogger("mnist-serve")

# Methods that stay open with --auth-token-file: liveness and readiness, as probes call them.
OPEN_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})
# Services whose every other method needs the token: inference and model description/control.
PROTECTED_SERVICES = ("/mnist.v1.Classifier/", "/inference.GRPCInferenceService/")
TOKEN_RECHECK_SECONDS = 1.0  # how often the token file's state is looked at


class SecurityConfigError(OSError):
    """A TLS or token file that cannot be used; the message says which and why."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {what} {path} ({error.strerror})") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def _state(paths: Sequence[Path]) -> tuple:
    """What changes when a file is rewritten or replaced (a Secret's symlink swap included)."""
    stats = []
    for path in paths:
        try:
            info = os.stat(path)
            stats.append((info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        # gRPC would only fail at the first handshake; check the pair now, with one clear line.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
        except (ssl.SSLError, OSError) as error:
            raise SecurityConfigError(f"--tls-cert {self.cert} / --tls-key {self.key} / --tls-client-ca "
                                      f"{self.client_ca}: not a usable PEM certificate, key and CA ({error})") from None
        return cert, key, ca


class ReloadingCertificates:
    """gRPC's certificate fetcher: the current certificate when the files changed, else None (keep it)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._state = _state(files.paths)
        self.reloads = 0
        self.initial = self._configuration(*files.load())

    def _configuration(self, cert: bytes, key: bytes, ca: bytes | None) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            state = _state(self.files.paths)
            if state == self._state:
                return None
            try:
                configuration = self._configuration(*self.files.load())
            except SecurityConfigError as error:
                # Half-written files (cert renewed, key not yet): keep serving the old pair, try again later.
                log.warning("TLS files changed but cannot be used yet; keeping the previous certificate: %s", error)
                return None
            self._state = state
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return configuration


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (or mTLS when files.client_ca is set) credentials that follow the files when they change."""
    fetcher = ReloadingCertificates(files)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher, require_client_authentication=files.client_ca is not None)


def http_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSLContext for the HTTP port that also follows the files: each new handshake picks the newest."""
    files.load()  # one clear error now rather than at the first handshake

    def build() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.cert, files.key)
        if files.client_ca:
            context.load_verify_locations(files.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    current = {"state": _state(files.paths), "context": build()}
    lock = threading.Lock()

    def pick_newest(sock: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        # Called during every handshake: swapping the socket's context is how Python serves a new certificate.
        with lock:
            state = _state(files.paths)
            if state != current["state"]:
                try:
                    current["context"] = build()
                    current["state"] = state
                    current["context"].sni_callback = pick_newest
                    log.info("TLS certificate reloaded for HTTP from %s", files.cert)
                except (ssl.SSLError, OSError) as error:
                    log.warning("TLS files changed but cannot be used yet; keeping the previous certificate: %s", error)
            sock.context = current["context"]

    current["context"].sni_callback = pick_newest
    return current["context"]


class TokenFile:
    """The expected bearer token, re-read when its file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = _state([path])
        self._token = self._load()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _load(self) -> bytes:
        token = _read(self.path, "--auth-token-file").strip()
        if len(token.split()) != 1:
            raise SecurityConfigError(f"--auth-token-file {self.path} must hold one token (no spaces)")
        return token

    def current(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= TOKEN_RECHECK_SECONDS:
                self._checked = now
                state = _state([self.path])
                if state != self._state:
                    try:
                        self._token, self._state = self._load(), state
                        log.info("auth token reloaded from %s", self.path)
                    except SecurityConfigError as error:
                        log.warning("auth token file changed but cannot be used; keeping the previous token: %s",
                                    error)
            return self._token

    def accepts(self, presented: bytes | None) -> bool:
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        return presented is not None and hmac.compare_digest(presented, self.current())


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of an "authorization: Bearer <token>" entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode("latin-1", "replace")
    return None


def needs_token(method: str) -> bool:
    return method.startswith(PROTECTED_SERVICES) and method not in OPEN_METHODS


# HTTP paths that stay open with --auth-token-file: health, the page itself, and a model's readiness.
OPEN_HTTP_PREFIXES = ("/v2/health/", "/static/")
OPEN_HTTP_PATHS = frozenset({"/", "/favicon.ico"})


def http_needs_token(path: str) -> bool:
    if path in OPEN_HTTP_PATHS or path.startswith(OPEN_HTTP_PREFIXES):
        return False
    return not (path.startswith("/v2/models/") and path.endswith("/ready"))


def http_token_middleware(token: TokenFile):
    """The REST port's token check: the same rule and error as gRPC's (401 from the error table)."""
    from aiohttp import web  # the HTTP transport's dependency, loaded only when it runs

    @web.middleware
    async def check_token(request, handler):
        if http_needs_token(request.path):
            presented = bearer_token(list(request.headers.items()))
            if presented is None:
                raise Unauthenticated("this call needs a bearer token: send the header "
                                      "'Authorization: Bearer <token>' (the server runs with --auth-token-file)")
            if not token.accepts(presented):
                raise Unauthenticated("the bearer token is not valid for this server")
        return await handler(request)

    return check_token


def token_checked(handler: grpc.RpcMethodHandler, token: TokenFile) -> grpc.RpcMethodHandler:
    """`handler` refusing calls without the right bearer token: Unauthenticated, mapped to UNAUTHENTICATED.

    It sits inside the error mapping (serving.grpc_api.handlers), so the refusal gets its status
    code there and is counted in the metrics like any call.
    """
    behaviour = handler.unary_unary

    async def guarded(request, context: grpc.aio.ServicerContext):
        presented = bearer_token(context.invocation_metadata())
        if presented is None:
            raise Unauthenticated("this call needs a bearer token: send the metadata "
                                  "'authorization: Bearer <token>' (the server runs with --auth-token-file)")
        if not token.accepts(presented):
            raise Unauthenticated("the bearer token is not valid for this server")
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
