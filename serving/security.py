"""Transport security's files, whatever the transport: TLS and mutual TLS files, the bearer token.

- TLS (--tls-cert, --tls-key): both ports serve TLS with these PEM files. They are re-read when
  they change (a renewed certificate, e.g. cert-manager rewriting a Kubernetes Secret): each
  transport asks for the current certificate on each new connection, and gets it from the files'
  last-seen state. Connections already open keep the certificate they were made with.
- mTLS (--tls-client-ca): every client must present a certificate signed by that CA; one without
  a certificate, with a certificate from another CA, or with an expired one never gets a
  connection (the handshake fails: UNAVAILABLE on a gRPC client).
- Tokens (--auth-token-file): inference and model calls must carry "Bearer <token>" in their
  authorization metadata or header (Unauthenticated otherwise). Health, readiness, reflection,
  the page and /metrics stay open, so probes and scrapers need no secret. The file is re-read when
  it changes, so a token rotates without a restart.

Every file is watched the same way (WatchedFiles). Each transport's side lives beside it:
serving.grpc_api.security (certificate fetcher, the token check of each method) and
serving.http_api.security (the HTTPS context, the token middleware).
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from serving.inference.errors import Unauthenticated

log = logging.getLogger("mnist-serve")

TOKEN_RECHECK_SECONDS = 1.0  # how often the token file's state is looked at (it is read per call)

T = TypeVar("T")


class SecurityConfigError(OSError):
    """A TLS or token file that cannot be used; the message says which and why."""


def read_file(path: Path, what: str) -> bytes:
    """The file's bytes, or SecurityConfigError naming the flag (`what`) when unreadable or empty."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {what} {path} ({error.strerror})") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def file_state(paths: Sequence[Path]) -> tuple:
    """What changes when a file is rewritten or replaced (a Secret's symlink swap included)."""
    stats = []
    for path in paths:
        try:
            info = os.stat(path)
            stats.append((info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


class WatchedFiles(Generic[T]):
    """A value made from files, made again when they change: the one way files are reloaded.

    The first load raises SecurityConfigError (one clear line at start-up). Later, a change that
    cannot be used yet (cert renewed, key not yet written) keeps the previous value and is tried
    again at the next look; so a half-written Secret never takes a port down. Thread-safe: gRPC
    fetches certificates from its own threads.
    """

    def __init__(
        self, paths: Sequence[Path], load: Callable[[], T], what: str, recheck_seconds: float = 0.0
    ) -> None:
        self.paths = tuple(paths)
        self.what = what  # for the log: "TLS certificate", "auth token", ...
        self.reloads = 0
        self._load = load
        self._recheck = recheck_seconds  # 0: look at the files' state on every call
        self._lock = threading.Lock()
        self._state = file_state(
            self.paths
        )  # before loading: a change during the load is seen next
        self._value = load()
        self._looked = time.monotonic()

    def current(self) -> tuple[T, bool]:
        """The value from the files' newest usable state, and whether this call reloaded it."""
        with self._lock:
            if self._recheck:
                now = time.monotonic()
                if now - self._looked < self._recheck:
                    return self._value, False
                self._looked = now
            state = file_state(self.paths)
            if state == self._state:
                return self._value, False
            try:
                value = self._load()
            except SecurityConfigError as error:
                log.warning(
                    "%s files changed but cannot be used yet; keeping the previous one: %s",
                    self.what,
                    error,
                )
                return self._value, False
            self._value, self._state = value, state
            self.reloads += 1
        log.info("%s reloaded from %s", self.what, self.paths[0])
        return value, True


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def ssl_context(self) -> ssl.SSLContext:
        """A server SSLContext from the files now: TLS 1.2 or newer, client certificates with mTLS."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as error:
            raise SecurityConfigError(
                f"--tls-cert {self.cert} / --tls-key {self.key} / --tls-client-ca {self.client_ca}: "
                f"not a usable PEM certificate, key and CA ({error})"
            ) from None
        return context

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """The PEM bytes (cert, key, client CA), checked to be a usable pair now."""
        cert, key = read_file(self.cert, "--tls-cert"), read_file(self.key, "--tls-key")
        ca = read_file(self.client_ca, "--tls-client-ca") if self.client_ca else None
        # gRPC would only fail at the first handshake; check the pair now, with one clear line.
        self.ssl_context()
        return cert, key, ca


class TokenFile:
    """The expected bearer token, re-read when its file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._watched = WatchedFiles([path], self._load, "auth token", TOKEN_RECHECK_SECONDS)

    def _load(self) -> bytes:
        token = read_file(self.path, "--auth-token-file").strip()
        if len(token.split()) != 1:
            raise SecurityConfigError(
                f"--auth-token-file {self.path} must hold one token (no spaces)"
            )
        return token

    def current(self) -> bytes:
        return self._watched.current()[0]

    def accepts(self, presented: bytes | None) -> bool:
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        return presented is not None and hmac.compare_digest(presented, self.current())

    def check(self, presented: bytes | None, how_to_send: str) -> None:
        """Raise Unauthenticated unless `presented` is the token; `how_to_send`: the transport's
        words for where it goes ("the metadata 'authorization: Bearer <token>'")."""
        if presented is None:
            raise Unauthenticated(
                f"this call needs a bearer token: send {how_to_send} "
                "(the server runs with --auth-token-file)"
            )
        if not self.accepts(presented):
            raise Unauthenticated("the bearer token is not valid for this server")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of an "authorization: Bearer <token>" entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode("latin-1", "replace")
    return None
