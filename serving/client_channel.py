"""The client's gRPC channel: one per target, balanced per call (round_robin), inference retried
on UNAVAILABLE, replicas health-checked when the target names several, and TLS, tokens and
message sizes as the caller's flags say. serving/client.py makes its calls over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Inference is a pure function of its input, so a call refused with UNAVAILABLE (a replica draining,
# or a connection that broke before the answer) may run again elsewhere. gRPC retries at most 5
# attempts; the backoff before attempt n is random in [0, min(0.05 * 2^(n-1), 0.5)] s, so the
# retries of one call add at most 0.75 s.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
RETRIED_METHODS = [
    {"service": "mnist.v1.Classifier"},  # Classify and DescribeModel: both read-only
    {"service": "inference.GRPCInferenceService", "method": "ModelInfer"},
]
# Targets that name a resolver may stand for several replicas: there the client also watches each
# replica's grpc.health.v1 status and leaves a NOT_SERVING (draining) one out of the rotation at once.
MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def service_config(health_check: bool) -> str:
    """gRPC's service config (JSON): round_robin per call, retries, and optionally health checking."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": RETRIED_METHODS, "retryPolicy": RETRY_POLICY}],
    }
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


@dataclass(frozen=True)
class ClientTls:
    """How the client speaks TLS: the CA it trusts (None: the system's) and, for mTLS, its own certificate."""

    ca: Path | None = None
    cert: Path | None = (
        None  # with key: present this certificate (servers with --tls-client-ca ask for one)
    )
    key: Path | None = None
    server_name: str | None = (
        None  # the name to check in the server's certificate, when not the target's host
    )

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def read_token(path: Path | str | None) -> str | None:
    """The bearer token in a file (its one line), or None without a file."""
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token or len(token.split()) != 1:
        raise ValueError(f"{path} must hold one bearer token")
    return token


def client_security(
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token_file: str | None = None,
) -> tuple[ClientTls | None, str | None]:
    """The CLIs' and load tests' flags (--tls, --tls-ca, --tls-cert, --tls-key, --auth-token-file) as
    the client's `tls` and `token`; naming any TLS file turns TLS on."""
    wants_tls = tls or any((ca, cert, key))
    as_path = lambda text: Path(text) if text else None  # noqa: E731
    return (ClientTls(as_path(ca), as_path(cert), as_path(key)) if wants_tls else None), read_token(
        token_file
    )


def open_channel(
    target: str,
    max_message_bytes: int,
    min_resolution_interval: float | None = None,
    tls: ClientTls | None = None,
) -> grpc.Channel:
    """A channel to `target` with the service config above, over TLS when `tls` says so.

    `min_resolution_interval`: the fewest seconds between two DNS lookups of a `dns:` target
    (gRPC's default, 30 s, when None); a lookup follows every lost or aged connection."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        (
            "grpc.service_config",
            service_config(health_check=target.startswith(MULTI_ADDRESS_SCHEMES)),
        ),
    ]
    if min_resolution_interval is not None:
        options.append(
            ("grpc.dns_min_time_between_resolutions_ms", round(min_resolution_interval * 1000))
        )
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if tls is not None:
        return grpc.secure_channel(target, tls.credentials(), options=options)
    return grpc.insecure_channel(target, options=options)
