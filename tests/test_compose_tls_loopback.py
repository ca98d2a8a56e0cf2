"""envoy-tls.yaml and docker-compose.tls.yml's server settings with real processes on loopback:
a real `mnist-serve` run with the override's variables and checked by its healthcheck, Envoy on
envoy-tls.yaml in front of it; mTLS + token through Envoy answer correctly on gRPC and REST, no
client certificate, no token or plaintext are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.envoy import envoy_binary
from tests.support.tls_override import (
    TLS_OVERRIDE,
    accuracy,
    loopback_envoy_tls,
    make_dev_certs,
    on_host,
    predict,
    running_envoy,
)


def _healthcheck(override: dict, certs: Path, target: str) -> subprocess.CompletedProcess:
    """The container's healthcheck, run here against the server at `target`."""
    probe = on_host(override["server"]["healthcheck"]["test"][1:], certs)
    probe[probe.index("--target") + 1] = target
    return subprocess.run(
        [str(Path(sys.executable).parent / probe[0]), *probe[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rest_through_envoy(url: str, tls, certs: Path, mnist_test_set) -> tuple[float, object]:
    """REST on Envoy's 8000, JSON and binary answers (Envoy lowercases the binary answer's
    Inference-Header-Content-Length: the client must read header names case-insensitively):
    the accuracy with the token, and the error without it."""
    from serving.rest_client import RestClient, RestError

    images, labels = mnist_test_set[0][:300], mnist_test_set[1][:300]
    token = certs.joinpath("token").read_text().strip()
    with RestClient(url, timeout=30, tls=tls, token=token) as rest:
        predicted = np.concatenate(
            [
                rest.infer(images[start : start + 64], binary=start % 128 == 0).argmax(axis=1)
                for start in range(0, len(images), 64)
            ]
        )
    with RestClient(url, timeout=30, tls=tls) as rest, pytest.raises(RestError) as refused:
        rest.infer(images[:8], binary=False)
    return float((predicted == labels).mean()), refused.value


def _grpc_through_envoy(target: str, certs: Path, mnist_path: Path, envoy_log) -> None:
    mtls = [
        *("--tls-ca", str(certs / "ca.crt")),
        *("--tls-cert", str(certs / "client.crt")),
        *("--tls-key", str(certs / "client.key")),
    ]
    token = ["--auth-token-file", str(certs / "token")]
    for api in ("classifier", "kserve"):
        answered = predict(target, mnist_path, "--api", api, *mtls, *token)
        assert accuracy(answered) >= 0.9, envoy_log()
    # Refused: no client certificate (the handshake with Envoy), no token (the replica, through
    # Envoy), plaintext.
    no_cert = predict(target, mnist_path, "--tls-ca", str(certs / "ca.crt"), *token)
    assert no_cert.returncode == 1 and "answered UNAVAILABLE" in no_cert.stderr, no_cert.stderr
    no_token = predict(target, mnist_path, *mtls)
    assert no_token.returncode == 1 and "answered UNAUTHENTICATED" in no_token.stderr, (
        no_token.stderr
    )
    plaintext = predict(target, mnist_path, *token, "--timeout", "5")
    assert plaintext.returncode == 1 and "answered UNAVAILABLE" in plaintext.stderr, (
        plaintext.stderr
    )


def test_envoy_tls_yaml_in_front_of_a_server_run_as_the_override_runs_it(
    trained_repository, mnist_path, mnist_test_set, tmp_path
):
    """The override's server variables and healthcheck, and envoy-tls.yaml, with real processes
    on loopback: mTLS + token through Envoy answer correctly on gRPC and REST; no client
    certificate or no token is refused."""
    from serving.client import ClassifierClient, ClientTls
    from serving.process import free_port, start_server

    binary = envoy_binary()
    certs = tmp_path / "certs"
    assert make_dev_certs(certs).returncode == 0
    override = yaml.safe_load(TLS_OVERRIDE.read_text())["services"]
    env = {key: on_host(value, certs) for key, value in override["server"]["environment"].items()}
    tls = ClientTls(certs / "ca.crt", certs / "client.crt", certs / "client.key")
    with start_server(
        trained_repository, "--workers", "1", env=env, tls=tls, log_path=tmp_path / "server.log"
    ) as server:
        health = _healthcheck(override, certs, server.target)
        assert health.returncode == 0, health.stdout + health.stderr
        grpc_port, http_port = free_port(), free_port()
        config = tmp_path / "envoy-tls.yaml"
        upstream = {8500: server.port, 8000: server.http_port}
        config.write_text(loopback_envoy_tls(certs, grpc_port, http_port, upstream, free_port()))
        with running_envoy(binary, config, tmp_path / "envoy.log"):
            target = f"127.0.0.1:{grpc_port}"
            with ClassifierClient(target, timeout=10, tls=tls) as client:
                # grpc.health.v1 through Envoy, over TLS both ways, no token
                client.wait_until_ready(60)
            envoy_log = lambda: (tmp_path / "envoy.log").read_text()[-2000:]  # noqa: E731
            _grpc_through_envoy(target, certs, mnist_path, envoy_log)
            rest_accuracy, refused = _rest_through_envoy(
                f"127.0.0.1:{http_port}", tls, certs, mnist_test_set
            )
            assert rest_accuracy >= 0.9, envoy_log()
            assert refused.status == 401, refused
