"""The mnist-serve containers of rendered manifests: where they are, the configuration their
arguments and environment give the server, their ports and their preStop delay."""

from __future__ import annotations

from typing import Any

from serving.config import ENV_PREFIX, ServeConfig, load_config

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
