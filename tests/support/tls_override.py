"""docker-compose.tls.yml's files and what the TLS override tests run with them on this machine:
development certificates (docker/make-dev-certs.py), envoy-tls.yaml moved onto loopback, and
mnist-predict through it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.support.common import ROOT
from tests.support.envoy import start_envoy

TLS_OVERRIDE = ROOT / "docker-compose.tls.yml"
ENVOY_DIR = ROOT / "deploy" / "compose"
MAKE_DEV_CERTS = ROOT / "docker" / "make-dev-certs.py"
DEV_CERT_FILES = {"ca.crt", "server.crt", "server.key", "client.crt", "client.key", "token"}


def make_dev_certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MAKE_DEV_CERTS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def on_host(value, certs: Path):
    """A compose value with /certs/... read from the host's folder instead."""
    if isinstance(value, list):
        return [on_host(item, certs) for item in value]
    return value.replace("/certs/", f"{certs}/") if isinstance(value, str) else value


def loopback_envoy_tls(
    certs: Path, grpc_port: int, http_port: int, upstream: dict[int, int], admin_port: int
) -> str:
    """envoy-tls.yaml with the host's certificate folder, loopback listeners, and `server`'s
    ports on 127.0.0.1."""
    config = yaml.safe_load(on_host((ENVOY_DIR / "envoy-tls.yaml").read_text(), certs))
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    for listener, port in zip(config["static_resources"]["listeners"], (grpc_port, http_port)):
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address["address"] == "server"
        # The replica's certificate is still checked for the name `server` (sni and SAN match).
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": upstream[address["port_value"]],
        }
    return yaml.safe_dump(config)


@contextmanager
def running_envoy(binary: str, config: Path, log_path: Path) -> Iterator[None]:
    """Envoy on `config`, one worker thread, its log in `log_path`; terminated at the end."""
    envoy = start_envoy(binary, config, log_path, concurrency=1)
    try:
        yield
    finally:
        envoy.terminate()
        envoy.wait(10)


def predict(target: str, mnist_path: Path, *args: str) -> subprocess.CompletedProcess:
    """mnist-predict on 300 real MNIST test digits."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "mnist-predict"),
            *("--target", target, "--mnist-test", "300", "--data-dir", str(mnist_path)),
            *("--quiet", "--timeout", "30", *args),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def accuracy(result: subprocess.CompletedProcess) -> float:
    found = re.search(r"accuracy: \d+/\d+ = ([\d.]+)", result.stdout)
    assert result.returncode == 0 and found, result.stdout + result.stderr
    return float(found[1])
