"""A recurring log line at most once per interval, saying how many went unlogged.

For events a client can cause on every call (a malformed request, say): one line per call would
let any caller fill the log and spend the server's time writing it.
"""

from __future__ import annotations

import logging
import threading
import time


class OncePerInterval:
    """Logs a recurring event at most once per interval, saying how many went unlogged."""

    def __init__(self, interval: float, logger: logging.Logger) -> None:
        self.interval = interval
        self._log = logger
        self._lock = threading.Lock()  # callers may run on gRPC's threads (deserializers)
        self._next = 0.0
        self._unlogged = 0

    def note(self, text: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._unlogged += 1
                return
            unlogged, self._unlogged, self._next = self._unlogged, 0, now + self.interval
        self._log.warning(
            "%s (%d more since the last such line; logged at most once per %.0f s)",
            text,
            unlogged,
            self.interval,
        )
