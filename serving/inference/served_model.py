"""The model as every API sees it: which (name, version) it answers to, and batched prediction.

Transport-free: it takes arrays and a deadline and returns arrays, or raises the domain errors
of serving.inference.errors. A caller that goes away cancels its task; the batcher then skips
its request.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core.metadata import ModelMetadata
from core.repository import ModelVersion
from serving import payload_log
from serving.inference.batcher import DynamicBatcher
from serving.inference.errors import UnknownModel, UnknownVersion, quoted
from serving.inference.stats import InferenceStats

if TYPE_CHECKING:
    from serving.inference.registry import ModelRegistry


# The (model, version) the current call resolved to: the transports' metrics label the call with it.
# Each gRPC call and each HTTP request runs in its own asyncio context; the metrics wrapper sets
# NOBODY when a call starts and a lookup sets the version it found (one ContextVar.set, ~50 ns).
NOBODY = ("", "")
ANSWERING: ContextVar[tuple[str, str]] = ContextVar("answering", default=NOBODY)


class ModelLookup(Protocol):
    """What the APIs serve from: a call's (model, version) to the ServedModel that computes it.

    serving.inference.registry.ModelRegistry is the server's; a lone ServedModel is one too.
    Empty name: the default model; empty version: the newest ready one.
    """

    max_batch_size: int
    # The registry behind the lookup, with its model repository: what Triton's extensions
    # (configuration, statistics, the repository index, load/unload) ask. None: a lone model.
    registry: ModelRegistry | None

    def resolve(self, name: str, version: str) -> ServedModel: ...
    def is_ready(self, name: str, version: str) -> bool: ...
    def ready_versions(self, name: str) -> list[int]: ...


@dataclass
class ServedModel:
    version: ModelVersion
    provider: str
    max_batch_size: int
    batcher: DynamicBatcher
    stats: InferenceStats = field(default_factory=InferenceStats)  # Triton's ModelStatistics

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def version_label(self) -> str:
        return str(self.version.version)

    @property
    def answering(self) -> tuple[str, str]:
        """The (model, version) labels of the calls this version answers."""
        return self.name, self.version_label

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

    # A lone ServedModel is also a ModelLookup, so the APIs can serve a model built by hand
    # (in-process tests): without a registry, so without Triton's extensions.
    registry = None  # not a field: a class attribute, the same for every lone model

    def resolve(self, name: str, version: str) -> ServedModel:
        self.check(name, version)
        ANSWERING.set(self.answering)
        return self

    def is_ready(self, name: str, version: str) -> bool:
        return self.serves(name, version)

    def ready_versions(self, name: str) -> list[int]:
        return [self.version.version] if name in ("", self.name) else []

    async def predict(
        self, images: np.ndarray, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Probabilities [N, classes] for `images` [N, 28, 28, 1] through the batcher.

        `deadline` is a time.monotonic() instant after which the answer is useless (None: no
        deadline). `request_id` names the call in the payload log (serving.payload_log), when one
        is on. Raises QueueFull, DeadlinePassed or ShuttingDown.
        """
        started = time.perf_counter()
        sink = payload_log.active
        try:
            probabilities = await self.batcher.submit(images, deadline)
        except (
            Exception
        ) as error:  # queue full, deadline, draining: a failed request in the statistics
            latency = time.perf_counter() - started
            self.stats.request_done(latency, ok=False)
            if sink is not None and sink.sampled():
                sink.offer(self._sample(request_id, images, None, latency, type(error).__name__))
            raise
        latency = time.perf_counter() - started
        self.stats.request_done(latency, ok=True)
        if sink is not None and sink.sampled():
            sink.offer(self._sample(request_id, images, probabilities, latency, "OK"))
        return probabilities

    def _sample(
        self,
        request_id: str,
        images: np.ndarray,
        probabilities: np.ndarray | None,
        latency: float,
        outcome: str,
    ) -> payload_log.CallSample:
        return payload_log.CallSample(
            time.time(),
            request_id or uuid.uuid4().hex,
            self.name,
            self.version_label,
            images,
            probabilities,
            tuple(self.class_names),
            latency,
            outcome,
        )
