"""Triton's gRPC extensions as messages: model configuration, statistics and the repository index.

Pure conversions from the model registry (serving.inference.registry) to the messages of
Triton's grpc_service.proto; the servicer methods that call them are in kserve.py, since
Triton serves them on the same inference.GRPCInferenceService.
"""
from __future__ import annotations

from serving.generated import grpc_predict_v2_pb2 as pb
from serving.inference.registry import IndexEntry
from serving.inference.served_model import ServedModel
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
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input), compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=pb.StatisticDuration(), cache_miss=pb.StatisticDuration(),  # no response cache
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_input=_duration(b.compute_input),
                                    compute_infer=_duration(b.compute_infer),
                                    compute_output=_duration(b.compute_output))
            for size, b in sorted(stats.batches.items())
        ],
    )


def repository_index(entries: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in entries
    ])
