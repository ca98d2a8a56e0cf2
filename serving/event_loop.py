"""The event loop every server process runs on: uvloop where it is installed, else asyncio's own.

All of a process's per-call work (gRPC's completions, the servicers, the batcher, REST) runs on one
event loop, so the loop's own bookkeeping is paid on every call. uvloop does it in C. Measured on
this project's 2-core machine (32 callers x 1 image, `make bench`'s calls): mnist-serve answered
4 % more calls per second and a lone caller's p50 fell by 0.08 ms. uvloop is a dependency on Linux
and macOS; elsewhere (Windows) asyncio's loop serves, with the same behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on uvloop when it is available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
