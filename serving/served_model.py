"""The model as both APIs see it: identity checks and batched prediction, with gRPC status mapping."""
from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np

from serving.batcher import DeadlineExceeded, DynamicBatcher, QueueFull, ShuttingDown
from serving.repository import ModelVersion


@dataclass
class ServedModel:
    version: ModelVersion
    provider: str
    max_batch_size: int
    batcher: DynamicBatcher

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def version_label(self) -> str:
        return str(self.version.version)

    def serves(self, name: str, version: str) -> bool:
        """Whether a request's (name, version) means this model; empty means "the served one"."""
        return name in ("", self.name) and version in ("", self.version_label)

    async def check(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        if name not in ("", self.name):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown model '{name}'; this server serves '{self.name}'")
        if version not in ("", self.version_label):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model '{self.name}' version '{version}' is not served; this server serves version "
                f"{self.version_label} (leave the version empty for it)",
            )

    async def predict(self, images: np.ndarray, context: grpc.aio.ServicerContext) -> np.ndarray:
        """Probabilities for `images` through the batcher; queue trouble becomes a gRPC status."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self.batcher.submit(images, deadline)
        except QueueFull as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except DeadlineExceeded as err:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except ShuttingDown as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        raise AssertionError("unreachable: context.abort raises")
