"""The Kubernetes manifests' parts, offline: the base's probes, security, resources, services, PDB,
HPA and scrape config, and what each overlay (gpu, kserve, triton, tls) changes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from serving.config import load_config
from tests.support.manifest_containers import (
    KSERVE_MODEL_MOUNT,
    KSERVE_PROTOCOLS,
    port_number,
    server_config,
)
from tests.support.manifests import objects, render, the


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
