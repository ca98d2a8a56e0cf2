"""deploy/swarm/stack.tls.yml merged on stack.yml as `docker stack deploy -c -c` merges it:
rendered by `docker stack config` (a docker client, no engine), checked without a cluster."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.common import ROOT
from tests.support.engine import CI
from tests.support.swarm_cluster import run


def test_tls_override_hands_certificates_and_token_as_secrets(tmp_path):
    """deploy/swarm/stack.tls.yml merged on stack.yml as `docker stack deploy -c -c` merges it."""
    if shutil.which("docker") is None:
        if CI:
            pytest.fail("no docker client: under CI=true this test must run")
        pytest.skip("no docker client on PATH (docker stack config renders the stack)")
    certs = tmp_path / "certs"
    run(sys.executable, str(ROOT / "docker" / "make-dev-certs.py"), "--out", str(certs))
    env = {
        **os.environ,
        "CERTS_DIR": str(certs),
        "REGISTRY": "registry.example:5000",
        "MODEL_REGISTRY": "https://registry.example:5000",
    }
    rendered = run(
        "docker",
        "stack",
        "config",
        "-c",
        str(ROOT / "deploy/swarm/stack.yml"),
        "-c",
        str(ROOT / "deploy/swarm/stack.tls.yml"),
        env=env,
    ).stdout
    stack = yaml.safe_load(rendered)
    services = stack["services"]
    files = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key", "token")
    targets = {
        name: {s.get("target") for s in service.get("secrets", [])}
        for name, service in services.items()
    }
    assert {f"/certs/{f}" for f in files} <= targets["server"]
    assert {f"/certs/{f}" for f in files if f != "token"} <= targets["envoy"]
    assert {"/certs/ca.crt", "/certs/client.crt", "/certs/client.key", "/certs/token"} <= targets[
        "locust"
    ]
    server = services["server"]
    assert server["environment"]["MNIST_SERVE_TLS_CLIENT_CA"] == "/certs/ca.crt"
    assert server["environment"]["MNIST_SERVE_AUTH_TOKEN_FILE"] == "/certs/token"
    assert "--tls-cert /certs/client.crt" in server["environment"]["PROBE_TLS_ARGS"]
    # One probe command, not the base's and the override's concatenated.
    assert (
        server["healthcheck"]["test"][0] == "CMD-SHELL" and len(server["healthcheck"]["test"]) == 2
    )
    assert services["envoy"]["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy-tls.yaml"]
    assert stack["configs"]["envoy_tls"]["file"] == str(ROOT / "deploy/compose/envoy-tls.yaml")
    assert "--auth-token-file" in services["locust"]["command"]
    for name in ("ca_crt", "server_key", "token"):
        assert Path(stack["secrets"][name]["file"]).parent == certs
    # Every service stays off IPVS: dnsrr, host-mode ports.
    for name, service in services.items():
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        assert all(port["mode"] == "host" for port in service.get("ports", [])), name


# --- model_sync.py against a real registry (no engine needed) ---------------------------------------
