"""The model as every API sees it: which (name, version) it answers to, and batched prediction.

Transport-free: it takes arrays and a deadline and returns arrays, or raises the domain errors
of serving.inference.errors. A caller that goes away cancels its task; the batcher then skips
its request.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.metadata import ModelMetadata
from core.repository import ModelVersion
from serving.inference.batcher import DynamicBatcher
from serving.inference.errors import UnknownModel, UnknownVersion, quoted


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

    @property
    def metadata(self) -> ModelMetadata:
        return self.version.metadata

    @property
    def class_names(self) -> list[str]:
        return self.version.class_names

    def serves(self, name: str, version: str) -> bool:
        """Whether a request's (name, version) means this model; empty means "the served one"."""
        return name in ("", self.name) and version in ("", self.version_label)

    def check(self, name: str, version: str) -> None:
        """Raise UnknownModel or UnknownVersion unless (name, version) means this model."""
        if name not in ("", self.name):
            raise UnknownModel(f"unknown model {quoted(name)}; this server serves '{self.name}'")
        if version not in ("", self.version_label):
            raise UnknownVersion(
                f"model '{self.name}' version {quoted(version)} is not served; this server serves version "
                f"{self.version_label} (leave the version empty for it)"
            )

    async def predict(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Probabilities [N, classes] for `images` [N, 28, 28, 1] through the batcher.

        `deadline` is a time.monotonic() instant after which the answer is useless (None: no
        deadline). Raises QueueFull, DeadlinePassed or ShuttingDown.
        """
        return await self.batcher.submit(images, deadline)
