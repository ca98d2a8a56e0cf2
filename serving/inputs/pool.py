"""Encoded images decoded off the event loop, in a bounded pool, within a per-call pixel budget.

Decoding a large PNG takes a core for a second or more. On the event loop that second would be
every caller's: one Classify of 64 large images once held all clients for 35 s. Here the cheap
checks (image count, and the pixels every encoded image will decode to, read from the headers)
run on the loop and refuse an oversized call at once; the decoding itself runs on a few threads
(Pillow and numpy release the GIL while they work), so a heavy call costs its own latency only.
Requests of raw or float pixels need no decoding worth moving and are converted on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from serving import tracing
from serving.inference.errors import QueueFull
from serving.inputs.framing import DEFAULT_MAX_DECODED_PIXELS
from serving.inputs.wire import check_classify_request, decode_classify_images, has_encoded

if TYPE_CHECKING:
    from serving.generated import mnist_classifier_pb2

DEFAULT_DECODE_THREADS = 1  # per worker process; a heavy call then takes one core, not all
WAITING_PER_THREAD = (
    8  # calls with encoded images waiting per decoding thread before new ones are shed
)


class DecodePool:
    """A ClassifyRequest's images to a model batch, the heavy part on `threads` worker threads."""

    def __init__(
        self,
        threads: int = DEFAULT_DECODE_THREADS,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
    ) -> None:
        self.threads = threads
        self.max_decoded_pixels = max_decoded_pixels
        self._max_calls = threads * WAITING_PER_THREAD
        self._calls = 0  # calls decoding or waiting for a thread; only the event loop changes it
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    async def classify_images(
        self, images: Sequence[mnist_classifier_pb2.Image], max_batch_size: int
    ) -> np.ndarray:
        """The request's images as a float32 batch [N, 28, 28, 1]; InvalidInput or QueueFull otherwise."""
        if tracing.on:
            with tracing.stage("decode", images=len(images)):
                return await self._classify_images(images, max_batch_size)
        return await self._classify_images(images, max_batch_size)

    async def _classify_images(
        self, images: Sequence[mnist_classifier_pb2.Image], max_batch_size: int
    ) -> np.ndarray:
        check_classify_request(images, max_batch_size, self.max_decoded_pixels)
        if not has_encoded(images):
            return decode_classify_images(images, max_batch_size)
        if self._calls >= self._max_calls:
            raise QueueFull(f"{self._calls} calls are decoding images already; retry with backoff")
        self._calls += 1
        try:
            # A caller that goes away cancels this await; a call still waiting for a thread is dropped.
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, decode_classify_images, images, max_batch_size
            )
        finally:
            self._calls -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
