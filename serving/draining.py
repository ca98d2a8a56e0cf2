"""When a draining process stops listening, so that its refusals can tell callers when to retry.

gRPC's server shutdown (grpc.aio.Server.stop) ends every call that reaches the process after it
began with CANCELLED: the calls gRPC holds that the event loop had not yet picked up, and those a
client sent before it read the GOAWAY (grpc core's server.cc "zombifies" both). A client retries
UNAVAILABLE, never CANCELLED, so such a call was lost. Measured before this module, with
--workers 4 and 24 retrying callers on one address: 5 or 6 CANCELLED in each drain.

So a draining server refuses new calls with UNAVAILABLE (gRPC) or 503 (REST) and says how long to
wait before the retry: gRPC's `grpc-retry-pushback-ms` trailer, which gRPC's own retries obey,
and HTTP's Retry-After. The wait runs past the moment the listener closes (`stop_at` + MARGIN),
so every retrying caller is waiting, not sending, when the shutdown starts; its retry then meets
a closed port (a lone server: UNAVAILABLE, as it would) or another replica. A caller that does
not retry gets the same UNAVAILABLE / 503 and decides itself.

One server per process (--workers are processes), hence module state: the Server sets the plan,
both transports' refusals read it.
"""

from __future__ import annotations

import math
import time

# How long after the listener closes a refused caller's retry comes: grpc.aio's stop() with no
# call left in flight takes a few ms; 0.5 s covers a loaded machine (2 cores, 8 test processes).
MARGIN = 0.5

_stop_at: float | None = None  # time.monotonic() at which this process stops listening


def plan_stop(at: float) -> None:
    """From now on refusals ask callers to come back after `at` (time.monotonic()) + MARGIN."""
    global _stop_at
    _stop_at = at


def retry_after() -> float:
    """Seconds a refused caller should wait before its retry (MARGIN while no stop is planned)."""
    if _stop_at is None:
        return MARGIN
    return max(0.0, _stop_at - time.monotonic()) + MARGIN


def grpc_pushback() -> tuple[tuple[str, str], ...]:
    """The trailer of a refused gRPC call: gRPC's retry waits this many ms before its next try."""
    return (("grpc-retry-pushback-ms", str(math.ceil(retry_after() * 1000))),)


def http_headers() -> dict[str, str]:
    """The headers of a refused REST call: when to retry, and close this connection after the answer
    (so that no request of a kept-alive connection meets the listener's close)."""
    return {"Retry-After": str(max(1, math.ceil(retry_after()))), "Connection": "close"}
