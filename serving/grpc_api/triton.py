"""Triton's extensions as messages: model configuration, statistics, the repository index, load/unload.

TritonExtensions is the one implementation both transports call: it checks the request (is there
a model repository, are Triton's unsupported overrides asked for), asks the model registry
(serving.inference.registry), and answers with the messages of Triton's grpc_service.proto. The
gRPC servicer (kserve.py) sends those messages as they are; the REST routes
(serving.http_api.extensions) send them as JSON. No grpc import here: only the protobuf messages.
"""

from __future__ import annotations

from collections.abc import Iterable

from serving.generated import grpc_predict_v2_pb2 as pb
from serving.generated import model_config_pb2
from serving.inference.errors import InvalidInput, ModelControlDisabled
from serving.inference.registry import IndexEntry, ModelRegistry
from serving.inference.served_model import ModelLookup, ServedModel
from serving.inference.stats import Duration

# What ServerMetadata lists, in Triton's names: the extensions this server implements.
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data"]


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    stats = model.stats.snapshot()
    return pb.ModelStatistics(
        name=model.name,
        version=model.version_label,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),  # no response cache
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(stats.batches.items())
        ],
    )


def repository_index(entries: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=e.version, state=e.state, reason=e.reason
            )
            for e in entries
        ]
    )


class TritonExtensions:
    """Triton's extensions over the server's model lookup, whichever transport asks."""

    def __init__(self, lookup: ModelLookup) -> None:
        self.lookup = lookup  # the server's registry; a lone ServedModel in in-process tests

    @property
    def extensions(self) -> list[str]:
        """What server metadata lists: these extensions only when there is a model repository."""
        return EXTENSIONS if self.lookup.registry is not None else []

    def config(self, name: str, version: str) -> model_config_pb2.ModelConfig:
        """The model's config.pbtxt; `version`, when given, must be a ready version (UnknownVersion)."""
        registry = self._registry("model configuration")
        registry.resolve(name, version)
        return registry.config(name)

    def statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        """Empty name: every model; empty version: every ready version of the model."""
        models = self._registry("statistics").statistics(name, version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    def index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        return repository_index(self._registry("repository").index(ready_only=ready_only))

    async def load(self, name: str, parameters: Iterable[str]) -> None:
        """Load (or reload) `name`; explicit mode only (the registry refuses otherwise, in Triton's words)."""
        no_overrides(parameters)
        await self._registry("repository").load(name)

    async def unload(self, name: str, parameters: Iterable[str]) -> None:
        no_overrides(parameters)
        await self._registry("repository").unload(name)

    def _registry(self, extension: str) -> ModelRegistry:
        registry = self.lookup.registry
        if registry is None:
            raise ModelControlDisabled(
                f"this server has no model repository, so no {extension} extension"
            )
        return registry


def no_overrides(parameters: Iterable[str]) -> None:
    """Triton's load/unload overrides (`config`, `file:<path>`) are not supported: say so rather than ignore them.

    `parameters` are the names of the request's parameters. `unload_dependents` (which tritonclient
    always sends) is accepted: no model here has dependents.
    """
    overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if overrides:
        raise InvalidInput(
            f"load/unload parameters ({', '.join(overrides)}) are not supported: "
            "put the configuration and files in the model repository"
        )
