"""The TLS override, checked without a Docker engine: docker-compose.tls.yml as Compose merges it
on docker-compose.yml, deploy/compose/envoy-tls.yaml against the plain entry point, and the
certificates docker/make-dev-certs.py writes. On loopback: tests/test_compose_tls_loopback.py;
on a real engine: tests/test_compose_tls_stack.py."""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from tests.support.common import ROOT
from tests.support.compose import COMPOSE_FILE, docker_compose, load_compose
from tests.support.tls_override import (
    DEV_CERT_FILES,
    ENVOY_DIR,
    TLS_OVERRIDE,
    make_dev_certs,
)

CLIENT_FLAGS = [
    *("--tls-ca", "/certs/ca.crt"),
    *("--client-tls-cert", "/certs/client.crt"),
    *("--client-tls-key", "/certs/client.key"),
    *("--auth-token-file", "/certs/token"),
]  # Locust's
SERVER_ENV = {
    "MNIST_SERVE_TLS_CERT": "/certs/server.crt",
    "MNIST_SERVE_TLS_KEY": "/certs/server.key",
    "MNIST_SERVE_TLS_CLIENT_CA": "/certs/ca.crt",
    "MNIST_SERVE_AUTH_TOKEN_FILE": "/certs/token",
}
TLS_SOCKET = "envoy.transport_sockets.tls"


def merged_tls_config(exe: str, variables: dict[str, str]) -> dict:
    """`docker-compose -f docker-compose.yml -f docker-compose.tls.yml config`: the override as
    Compose merges it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "LOCUST_"))
        and key not in ("MNIST_DATA_DIR", "CERTS_DIR")
    }
    result = subprocess.run(
        [exe, "--profile", "gpu", "-f", str(COMPOSE_FILE), "-f", str(TLS_OVERRIDE), "config"],
        cwd=ROOT,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"docker-compose ... -f docker-compose.tls.yml config: {result.stderr}"
    )
    return yaml.safe_load(result.stdout)


def read_only_mounts(service: dict) -> dict[str, str]:
    """container path -> host source, of the service's read-only bind mounts (as `config`
    writes them)."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        if mode == ["ro"]:
            mounts[target] = source
    return mounts


def _check_servers(services: dict, base: dict, certs: str) -> None:
    for name in ("server", "server-gpu"):
        server = services[name]
        # The flags as MNIST_SERVE_* variables, beside the base file's; the command is the base's.
        assert SERVER_ENV.items() <= server["environment"].items(), server["environment"]
        assert server["command"] == base[name]["command"]
        assert read_only_mounts(server).get("/certs") == certs, server["volumes"]
        assert read_only_mounts(server).get("/models") == "models", (
            f"{name} lost its models volume: {server['volumes']}"
        )
        # Its healthcheck speaks mTLS, to the name its certificate holds (localhost).
        assert server["healthcheck"]["test"] == [
            *("CMD", "mnist-health-probe", "--target", "localhost:8500"),
            *("--tls-ca", "/certs/ca.crt", "--tls-cert", "/certs/client.crt"),
            *("--tls-key", "/certs/client.key"),
        ]
    assert services["server"]["environment"]["MNIST_SERVE_DEVICE"] == "cpu"  # merged, not replaced


def _check_envoy_and_locust(services: dict, base: dict, certs: str) -> None:
    envoy = services["envoy"]
    assert envoy["command"] == ["envoy", "-c", "/etc/envoy/envoy-tls.yaml", "--log-level", "warn"]
    mounts = read_only_mounts(envoy)
    assert mounts.get("/certs") == certs, envoy["volumes"]
    assert mounts.get("/etc/envoy/envoy-tls.yaml") == str(ENVOY_DIR / "envoy-tls.yaml"), envoy[
        "volumes"
    ]
    assert {port["target"] for port in envoy["ports"]} == {8500, 8000, 9901}  # the same entry
    # Locust: the base file's commands plus the client certificate and token, on the master and
    # each worker.
    for name in ("locust", "locust-worker"):
        assert services[name]["command"] == base[name]["command"] + CLIENT_FLAGS, services[name][
            "command"
        ]
        assert read_only_mounts(services[name]).get("/certs") == certs


def test_the_tls_override_gives_every_service_its_flags_and_files():
    exe = docker_compose()
    base = load_compose({})["services"]
    services = merged_tls_config(exe, {})["services"]
    certs = str(ROOT / "certs")
    _check_servers(services, base, certs)
    _check_envoy_and_locust(services, base, certs)
    # Every file the services name under /certs is one that make-dev-certs writes.
    named = set(
        re.findall(
            r"/certs/([\w.]+)",
            TLS_OVERRIDE.read_text() + (ENVOY_DIR / "envoy-tls.yaml").read_text(),
        )
    )
    assert named == DEV_CERT_FILES, named ^ DEV_CERT_FILES
    # CERTS_DIR points every service at another folder: production's own certificates.
    services = merged_tls_config(exe, {"CERTS_DIR": "/etc/mnist-tls"})["services"]
    for name in ("server", "server-gpu", "envoy", "locust", "locust-worker"):
        assert read_only_mounts(services[name]).get("/certs") == "/etc/mnist-tls", name


def _transport_socket(owner: dict, context: str) -> dict:
    socket = owner.get("transport_socket")
    assert socket and socket["name"] == TLS_SOCKET, owner.get("name", owner)
    typed = socket["typed_config"]
    assert (
        typed["@type"] == f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}"
    ), typed
    return typed


def _check_listeners(resources: dict) -> None:
    assert [listener["name"] for listener in resources["listeners"]] == ["grpc", "http"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            typed = _transport_socket(chain, "DownstreamTlsContext")
            assert typed["require_client_certificate"] is True  # as the replicas: mutual TLS
            common = typed["common_tls_context"]
            assert common["tls_certificates"] == [
                {
                    "certificate_chain": {"filename": "/certs/server.crt"},
                    "private_key": {"filename": "/certs/server.key"},
                }
            ]
            assert common["validation_context"]["trusted_ca"] == {"filename": "/certs/ca.crt"}
            assert "h2" in common["alpn_protocols"]  # gRPC clients need h2 by ALPN


def _check_clusters(resources: dict) -> None:
    assert {cluster["name"] for cluster in resources["clusters"]} == {
        "mnist_serve",
        "mnist_serve_http",
    }
    for cluster in resources["clusters"]:
        typed = _transport_socket(cluster, "UpstreamTlsContext")
        common = typed["common_tls_context"]
        assert typed["sni"] == "server"
        assert common["tls_certificates"] == [
            {
                "certificate_chain": {"filename": "/certs/client.crt"},
                "private_key": {"filename": "/certs/client.key"},
            }
        ]
        validation = common["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/certs/ca.crt"}
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "server"}}
        ]


def test_envoy_tls_yaml_is_the_plain_entry_point_with_tls_on_every_listener_and_cluster():
    tls = yaml.safe_load((ENVOY_DIR / "envoy-tls.yaml").read_text())
    resources = tls["static_resources"]
    _check_listeners(resources)
    _check_clusters(resources)
    # Without its transport sockets it is envoy.yaml with envoy-http.yaml merged on top (as
    # compose runs them): the routes, retries, health checks and balancing cannot drift apart.
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            del chain["transport_socket"]
    for cluster in resources["clusters"]:
        del cluster["transport_socket"]
    plain = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    http = yaml.safe_load((ENVOY_DIR / "envoy-http.yaml").read_text())
    for kind in ("listeners", "clusters"):
        plain["static_resources"][kind] += http["static_resources"][kind]
    assert tls == plain


def test_make_dev_certs_writes_a_ca_a_server_and_a_client_certificate_and_a_token(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path / "certs"
    made = make_dev_certs(out, "--san", "mnist.example", "--san", "10.0.0.7")
    assert made.returncode == 0 and made.stdout.count("\n") == 1, made.stdout + made.stderr
    assert {path.name for path in out.iterdir()} == DEV_CERT_FILES
    load = lambda name: x509.load_pem_x509_certificate((out / name).read_bytes())  # noqa: E731
    ca, server, client = load("ca.crt"), load("server.crt"), load("client.crt")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "server",
        "envoy",
        "localhost",
        "mnist.example",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "10.0.0.7",
    ]
    usage = lambda cert: list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)  # noqa: E731
    assert usage(server) == [ExtendedKeyUsageOID.SERVER_AUTH] and usage(client) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    token = (out / "token").read_text()
    assert len(token.split()) == 1 and len(token.strip()) >= 32
    # The containers' user (uid 1000) reads them through the bind mount.
    assert all((out / name).stat().st_mode & 0o044 == 0o044 for name in DEV_CERT_FILES)
    # A second run does not overwrite them: one line, exit 1; --force makes a new set.
    again = make_dev_certs(out)
    assert (
        again.returncode == 1
        and again.stderr.startswith("make-dev-certs: error:")
        and "--force" in again.stderr
        and again.stderr.count("\n") == 1
    ), again.stderr
    assert (out / "token").read_text() == token
    assert make_dev_certs(out, "--force").returncode == 0 and (out / "token").read_text() != token
