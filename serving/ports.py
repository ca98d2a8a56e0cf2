"""The ports a server takes: one that is taken is one clear line (`PortInUse`), not a traceback.

A lone server checks its ports before gRPC binds (gRPC would log its own lines and share a port
with SO_REUSEPORT); with --workers the parent checks them once, before any worker starts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from serving.config import ServeConfig


class PortInUse(OSError):
    """A port the server needs is taken."""


def ensure_port_free(host: str, port: int, flag: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PortInUse(
                f"cannot listen on {host}:{port} ({err.strerror}); "
                f"is another server running? choose another {flag}"
            ) from err


def ensure_ports_free(config: ServeConfig) -> None:
    """The gRPC port, and the HTTP port when it is on: a taken one is one clear line (PortInUse)."""
    ensure_port_free(config.host, config.port, "--port")
    if config.http_port:
        ensure_port_free(config.host, config.http_port, "--http-port")


def serve_metrics_or_refuse(serve: Callable[[int, str], Any], config: ServeConfig) -> Any:
    """`serve(port, host)` on --metrics-port; a port it cannot take is one clear line (PortInUse)."""
    try:
        return serve(config.metrics_port, config.host)
    except OSError as err:
        raise PortInUse(
            f"cannot serve metrics on {config.host}:{config.metrics_port} ({err.strerror}); "
            f"choose another --metrics-port, or 0 to turn metrics off"
        ) from err
