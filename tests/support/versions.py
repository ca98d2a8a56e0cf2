"""The lifecycle tests' view of a polling server: its poll flags, which versions it has ready, its
health, and where a version's model file lies."""

from __future__ import annotations

from pathlib import Path

import grpc

# One worker: with --workers N each worker polls and switches on its own (see the README).
POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.5", "--workers", "1")


FAILURES = "mnist_model_load_failures_total"


def model_file(repository: Path, name: str, version: int) -> Path:
    return repository / name / str(version) / "model.onnx"


def ready_versions(target: str, name: str = "mnist") -> list[int]:
    from serving.client import ClassifierClient

    with ClassifierClient(target) as client:
        try:
            return sorted(int(v) for v in client.describe(name).available_versions)
        except grpc.RpcError:
            return []


def health(target: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
