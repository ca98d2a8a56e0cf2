"""The Kubernetes manifests, offline: they render, they validate, and the server accepts their flags.

`kubectl kustomize` renders the base and every overlay; each object is validated strictly (unknown
fields are errors) against the Kubernetes 1.32 schemas (kubernetes-validate) or, for KServe's
objects, against the schemas vendored from KServe's CRDs (deploy/kubernetes/schemas/). The server's
own configuration loader parses every mnist-serve container's arguments and environment, so a
typo in a flag fails here, not in a cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serving.config import ENV_PREFIX, ServeConfig, load_config
from tests.support.manifests import KSERVE_SCHEMAS, SCHEMAS, objects, render, the, validation_errors

RENDERS = [
    "base",
    "overlays/gpu",
    "overlays/kserve",
    "overlays/triton",
    "overlays/tls",
    "overlays/monitoring",
]
KSERVE_GROUP = "serving.kserve.io"
# KServe's protocol names (pkg/constants: ProtocolV1, ProtocolV2, ProtocolGRPCV1, ProtocolGRPCV2).
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
KSERVE_MODEL_MOUNT = "/mnt/models"  # pkg/constants: DefaultModelLocalMountPath


def mnist_serve_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every container that runs mnist-serve: in Deployments and in KServe ServingRuntimes."""
    found = []
    for doc in docs:
        if doc["kind"] == "Deployment":
            containers = doc["spec"]["template"]["spec"]["containers"]
        elif doc["kind"] == "ServingRuntime":
            containers = doc["spec"]["containers"]
        else:
            continue
        found += [
            (f"{doc['kind']}/{doc['metadata']['name']}", c)
            for c in containers
            if c.get("command", [None])[0] == "mnist-serve"
        ]
    return found


def server_config(container: dict[str, Any]) -> ServeConfig:
    """What mnist-serve would run with: its loader reads the container's args and MNIST_SERVE_* env."""
    environ = {
        e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith(ENV_PREFIX)
    }
    try:
        return load_config(container.get("args", []), environ)
    except SystemExit as exit_:  # argparse's way to reject a flag; it printed the reason to stderr
        raise AssertionError(
            f"mnist-serve rejects the args {container.get('args')} (exit {exit_.code})"
        ) from None


def port_number(container: dict[str, Any], *names: str) -> int | None:
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") in names]
    return numbers[0] if numbers else None


def prestop_seconds(container: dict[str, Any]) -> int:
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep")
    assert sleep is not None, f"container {container['name']} has no preStop sleep"
    return int(sleep["seconds"])


# ---- rendering and schemas ----------------------------------------------------------------------


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


# ---- the server's own flags -----------------------------------------------------------------------


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


# ---- draining -----------------------------------------------------------------------------------


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


# ---- the base's parts ---------------------------------------------------------------------------


def test_base_probes_security_resources_and_volume() -> None:
    deployment = the(render("base"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    grpc_port = port_number(container, "grpc")
    for probe in (
        "startupProbe",
        "readinessProbe",
        "livenessProbe",
    ):  # Kubernetes' native gRPC probes
        assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe

    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    volumes = {v["name"]: v for v in pod["volumes"]}
    model_mount = next(
        m
        for m in container["volumeMounts"]
        if m["mountPath"] == str(server_config(container).model_repository)
    )
    claim = volumes[model_mount["name"]]["persistentVolumeClaim"]
    assert model_mount["readOnly"] is True
    assert claim["claimName"] == the(render("base"), "PersistentVolumeClaim")["metadata"]["name"]


def test_base_services_pdb_and_hpa_select_the_servers() -> None:
    docs = render("base")
    deployment = the(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selects_pods = lambda selector: selector.items() <= pod_labels.items()  # noqa: E731

    services = {s["metadata"]["name"]: s["spec"] for s in objects(docs, "Service")}
    headless = [s for s in services.values() if s.get("clusterIP") == "None"]
    cluster_ip = [
        s
        for s in services.values()
        if s.get("type", "ClusterIP") == "ClusterIP" and s.get("clusterIP") != "None"
    ]
    assert len(headless) == 1 and len(cluster_ip) == 1, services
    grpc_port = port_number(deployment["spec"]["template"]["spec"]["containers"][0], "grpc")
    for spec in services.values():
        assert selects_pods(spec["selector"])
        assert any(
            p["port"] == grpc_port and p["appProtocol"] == "kubernetes.io/h2c"
            for p in spec["ports"]
        )

    pdb = the(docs, "PodDisruptionBudget")
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]

    hpa = the(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # one replica draining never leaves none


def test_the_scrape_config_finds_every_replicas_metrics_port() -> None:
    docs = render("base")
    deployment = the(docs, "Deployment")
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    metrics_port = server_config(container).metrics_port
    assert port_number(container, "metrics") == metrics_port
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)

    config_map = next(c for c in objects(docs, "ConfigMap") if "scrape" in c["metadata"]["name"])
    (job,) = yaml.safe_load(config_map["data"]["scrape-config.yaml"])["scrape_configs"]
    keeps = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]  # each replica its own target
    assert re.fullmatch(keeps[("__meta_kubernetes_pod_container_port_name",)], "metrics")
    assert re.fullmatch(
        keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)],
        template["metadata"]["labels"]["app.kubernetes.io/name"],
    )


# ---- overlays -----------------------------------------------------------------------------------


def test_gpu_overlay_asks_for_a_gpu_and_the_gpu_image() -> None:
    container = the(render("overlays/gpu"), "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].split(":")[0].endswith("-gpu")
    assert server_config(container).device == "cuda"


def test_kserve_overlay_wires_the_inference_service_to_the_runtime_and_the_model_volume() -> None:
    docs = render("overlays/kserve")
    assert not objects(docs, "Deployment"), (
        "KServe creates the pods; the overlay must not add a Deployment"
    )
    isvc, runtime = the(docs, "InferenceService"), the(docs, "ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in [
        {"name": f["name"], "version": f.get("version")}
        for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert set(runtime["spec"]["protocolVersions"]) <= KSERVE_PROTOCOLS

    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    first_port = container["ports"][
        0
    ]  # KServe routes to the first port; h2c/grpc names mean HTTP/2
    assert "h2c" in first_port["name"] or "grpc" in first_port["name"]
    config = server_config(container)
    assert str(config.model_repository) == KSERVE_MODEL_MOUNT
    assert config.model_name == isvc["metadata"]["name"], (
        "the v2 model name is the InferenceService's"
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.port == first_port["containerPort"]

    claim = re.fullmatch(r"pvc://([^/]+)(/.*)?", model["storageUri"])
    assert claim and claim.group(1) == the(docs, "PersistentVolumeClaim")["metadata"]["name"]

    headless = the(docs, "Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]
    }
    assert headless["spec"]["ports"][0]["port"] == config.port


def test_triton_overlay_serves_the_same_repository_with_tritons_image() -> None:
    docs = render("overlays/triton")
    base_container = the(render("base"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert container["command"] == ["tritonserver"]
    flags = dict(arg.split("=", 1) for arg in container["args"])
    # The same volume, at the same path, and the same ports as mnist-serve, so Services and clients stay.
    assert flags["--model-repository"] == str(server_config(base_container).model_repository)
    assert container["volumeMounts"] == base_container["volumeMounts"]
    assert (
        int(flags["--grpc-port"])
        == port_number(container, "grpc")
        == port_number(base_container, "grpc")
    )
    assert (
        int(flags["--metrics-port"])
        == port_number(container, "metrics")
        == port_number(base_container, "metrics")
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http" and "grpc" not in container[probe]
    assert int(flags["--http-port"]) == port_number(container, "http")


def test_tls_overlay_turns_on_mutual_tls_and_a_token_with_probes_that_speak_it():
    container = the(render("overlays/tls"), "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]
    config = load_config(container["args"], {})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_token_file) == (
        Path("/tls/tls.crt"),
        Path("/tls/tls.key"),
        Path("/tls/ca.crt"),
        Path("/token/token"),
    )
    # The kubelet's gRPC probes speak plaintext: every probe must be the mTLS exec probe instead.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], probe
        command = container[probe]["exec"]["command"]
        assert command[0] == "mnist-health-probe" and "/tls/tls.crt" in command, probe
    assert {"/tls", "/token"} <= {mount["mountPath"] for mount in container["volumeMounts"]}
