"""The Kubernetes manifests, offline: they render, they validate, and the server accepts their flags.

`kubectl kustomize` renders the base and every overlay; each object is validated strictly (unknown
fields are errors) against the Kubernetes 1.32 schemas (kubernetes-validate) or, for KServe's
objects, against the schemas vendored from KServe's CRDs (deploy/kubernetes/schemas/). The server's
own configuration loader parses every mnist-serve container's arguments and environment, so a
typo in a flag fails here, not in a cluster; and every drain fits in its termination grace."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.support.manifest_containers import (
    KSERVE_MODEL_MOUNT,
    RENDERS,
    mnist_serve_containers,
    port_number,
    prestop_seconds,
    server_config,
)
from tests.support.manifests import KSERVE_SCHEMAS, SCHEMAS, objects, render, the, validation_errors


@pytest.mark.parametrize("name", RENDERS)
def test_every_manifest_renders_and_validates_strictly(name: str) -> None:
    docs = render(name)
    assert docs, f"{name} renders nothing"
    errors = [error for doc in docs for error in validation_errors(doc)]
    assert not errors, "\n".join(errors)


def test_the_validators_reject_unknown_fields_and_wrong_types() -> None:
    """The schemas are strict: a misspelt field or a wrong type fails, for Kubernetes and KServe objects."""
    deployment = the(render("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert any("readinessprobe" in e for e in validation_errors(deployment))

    kserve = render("overlays/kserve")
    isvc = the(kserve, "InferenceService")
    isvc["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"
    assert any("storageURI" in e for e in validation_errors(isvc))
    runtime = the(kserve, "ServingRuntime")
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8500"
    assert validation_errors(runtime)

    for schema_file in KSERVE_SCHEMAS.values():  # and the vendored files are valid JSON Schemas
        jsonschema.Draft202012Validator.check_schema(
            json.loads((SCHEMAS / schema_file).read_text())
        )


@pytest.mark.parametrize("name", RENDERS)
def test_the_server_accepts_every_manifests_arguments(name: str) -> None:
    docs = render(name)
    containers = mnist_serve_containers(docs)
    if name == "overlays/triton":
        assert not containers, "the triton overlay must run Triton, not mnist-serve"
        return
    assert containers, f"{name} runs no mnist-serve container"
    for owner, container in containers:
        config = server_config(container)
        assert config.port == port_number(container, "grpc", "h2c"), (
            f"{owner}: --port is not the gRPC port"
        )
        # Every port the server opens is declared, under the name the Services and probes use.
        assert config.metrics_port == (port_number(container, "metrics") or 0), (
            f"{owner}: --metrics-port"
        )
        assert config.http_port == (port_number(container, "http") or 0), f"{owner}: --http-port"
        # Long-lived clients must get to replicas that start after them (the default, 0, never closes).
        assert config.max_connection_age > 0, f"{owner}: no --max-connection-age"
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        expected_repository = KSERVE_MODEL_MOUNT if owner.startswith("ServingRuntime") else None
        assert (
            str(config.model_repository) == expected_repository
            or str(config.model_repository) in mounts
        ), f"{owner}: --model-repository {config.model_repository} is not a mounted volume"
        assert config.device == ("cuda" if name == "overlays/gpu" else "auto"), (
            f"{owner}: --device {config.device}"
        )
        # Workers are set, never counted from the node's cores: one per core of the CPU limit, one per GPU.
        cpu_limit = float(str(container["resources"]["limits"]["cpu"]).removesuffix("m")) / (
            1000 if str(container["resources"]["limits"]["cpu"]).endswith("m") else 1
        )
        expected_workers = 1 if config.device == "cuda" else int(cpu_limit)
        assert config.workers == expected_workers, (
            f"{owner}: --workers {config.workers}, expected {expected_workers}"
        )


def test_a_misspelt_flag_in_a_manifest_fails() -> None:
    """The check above can fail: the loader refuses a flag mnist-serve does not have."""
    _, container = mnist_serve_containers(render("base"))[0]
    container["args"] = [*container["args"], "--grace-periods", "5"]
    with pytest.raises(AssertionError, match="rejects the args"):
        server_config(container)


def _triton_exit_timeout(container: dict[str, Any]) -> float:
    flags = dict(
        arg.split("=", 1) for arg in container["args"] if arg.startswith("--") and "=" in arg
    )
    return float(flags["--exit-timeout-secs"])


def drain_budgets(name: str) -> list[tuple[str, int, int, float]]:
    """(owner, terminationGracePeriodSeconds, preStop sleep, the server's own drain limit) per pod template."""
    docs = render(name)
    budgets = []
    for deployment in objects(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        drain = (
            server_config(container).grace_period
            if container["command"][0] == "mnist-serve"
            else _triton_exit_timeout(container)
        )
        budgets.append(
            (
                f"Deployment/{deployment['metadata']['name']}",
                pod["terminationGracePeriodSeconds"],
                prestop_seconds(container),
                drain,
            )
        )
    for isvc in objects(docs, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        runtime = next(
            r
            for r in objects(docs, "ServingRuntime")
            if r["metadata"]["name"] == predictor["model"]["runtime"]
        )
        container = runtime["spec"]["containers"][0]
        budgets.append(
            (
                f"InferenceService/{isvc['metadata']['name']}",
                predictor["terminationGracePeriodSeconds"],
                prestop_seconds(container),
                server_config(container).grace_period,
            )
        )
    return budgets


@pytest.mark.parametrize("name", RENDERS)
def test_termination_grace_outlasts_the_prestop_delay_plus_the_servers_grace_period(
    name: str,
) -> None:
    """Endpoints go first (preStop), then the server drains; the kubelet's SIGKILL must come after both."""
    budgets = drain_budgets(name)
    assert budgets
    for owner, termination, prestop, drain in budgets:
        assert prestop >= 1, (
            f"{owner}: a preStop delay lets endpoints be removed before draining starts"
        )
        assert termination > prestop + drain, (
            f"{owner}: terminationGracePeriodSeconds {termination} <= preStop {prestop} s + drain {drain} s"
        )
