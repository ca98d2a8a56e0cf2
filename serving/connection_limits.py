"""What bounds the connections of slow and stuck clients, as each transport's settings.

A client that connects and stalls (slowloris), sends its body a byte at a time, or stops reading
its answers costs the server a socket, its buffers and a little bookkeeping, and no CPU. The
limits below close such connections after a bounded time, so their number (and the file
descriptors and memory they hold) is bounded by the rate at which they are opened times the
timeout, and everything they held is released when they are closed. docs/reliability.md gives
the figures measured against 500 of each.

gRPC (grpc core's channel arguments):
- server_handshake_timeout: a connection that has not sent the HTTP/2 preface and its SETTINGS
  (after TLS, when on) is closed; grpc core's default is 120 s.
- max_concurrent_streams: calls in flight per connection, advertised in SETTINGS; a client past
  it waits for a stream, so one connection cannot queue unbounded work (default: unlimited).
- keepalive_time / keepalive_timeout: a connection quiet for keepalive_time is pinged; a client
  that stopped reading never answers, and is closed keepalive_timeout later. The HTTP/2 flow
  control window (64 KiB a stream) bounds what waits for it meanwhile.
- max_connection_idle: a connection with no call in flight gets GOAWAY (clients reconnect).

REST (aiohttp): the idle timeout (aiohttp's keepalive_timeout, armed when the connection opens
and after each answer) closes a connection that sent no complete request head: slow headers and
idle connections alike. aiohttp has no body timeout, so serving.http_api.app reads every body
under --http-body-timeout and answers 408. A client that stops reading holds its connection
until it closes it: aiohttp waits on the socket buffers (the kernel's, plus 64 KiB in the
transport), so what it holds is bounded, and it does not read further requests from it.
"""

from __future__ import annotations

from serving.config import ServeConfig


def slow_client_limits(config: ServeConfig) -> list[tuple[str, int]]:
    """grpc.aio.server options for config's --grpc-* limits."""
    return [
        ("grpc.server_handshake_timeout_ms", _ms(config.grpc_handshake_timeout)),
        ("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(config.grpc_keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.grpc_keepalive_timeout)),
        # grpc core stops pinging after 2 pings with no data sent: a stuck reader must stay pinged.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", _ms(config.grpc_max_connection_idle)),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
