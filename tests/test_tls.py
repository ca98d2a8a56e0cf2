"""TLS and mutual TLS on the real server, with certificates made at test time.

A CA signs the server's certificate (for 127.0.0.1) and the good client's; another CA signs the
wrong client's; the expired client certificate is the right CA's but out of date. A handshake that
fails is UNAVAILABLE on the client; certificate files are reloaded without a restart; the HTTP port
and the health probe use the same files."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest

from serving.client import ClientTls
from serving.process import free_port
from tests.support.pki import Issued, issue, make_ca, tls_args
from tests.support.secured import classify_code, http_status


def test_tls_serves_clients_that_trust_its_ca(tls_server, pki, mnist_test_set):
    assert (
        classify_code(tls_server.target, ClientTls(ca=pki["ca"].cert), mnist_test_set[0])
        == grpc.StatusCode.OK
    )


@pytest.mark.parametrize("client", ["plaintext", "trusting another CA"])
def test_tls_refuses_clients_that_cannot_verify_it(tls_server, pki, mnist_test_set, client):
    tls = None if client == "plaintext" else ClientTls(ca=pki["other_ca"].cert)
    assert classify_code(tls_server.target, tls, mnist_test_set[0]) == grpc.StatusCode.UNAVAILABLE


def test_an_expired_server_certificate_is_refused_by_the_client(
    trained_repository, pki, mnist_test_set, tmp_path
):
    """The server starts with it (a renewal may be late), but clients that check dates refuse it."""
    port, log = free_port(), tmp_path / "server.log"
    args = [
        sys.executable,
        "-m",
        "serving.cli",
        "--model-repository",
        str(trained_repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        *tls_args(pki["expired_server"]),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        serving = f" on 127.0.0.1:{port}"  # the log line that says the server is serving
        while (
            serving not in log.read_text() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.3)
        assert serving in log.read_text(), log.read_text()[-2000:]
        code = classify_code(f"127.0.0.1:{port}", ClientTls(ca=pki["ca"].cert), mnist_test_set[0])
        assert code == grpc.StatusCode.UNAVAILABLE
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def _install(files: Issued, source: Issued) -> None:
    files.key.write_bytes(source.key.read_bytes())
    files.cert.write_bytes(source.cert.read_bytes())


def _first_ok(target: str, tls: ClientTls, images, seconds: float = 20) -> grpc.StatusCode:
    deadline = time.monotonic() + seconds
    while (
        code := classify_code(target, tls, images)
    ) != grpc.StatusCode.OK and time.monotonic() < deadline:
        time.sleep(0.5)
    return code


def test_certificate_files_are_reloaded_without_a_restart(tls_server, pki, mnist_test_set):
    """A renewed certificate from a new CA: new connections get it, and the server never restarted."""
    new_ca = make_ca(pki["folder"], "renewed-ca")
    renewed = issue(pki["folder"], "renewed-server", new_ca, server=True)
    pid = tls_server.proc.pid
    try:
        _install(tls_server.tls_files, renewed)
        assert (
            _first_ok(tls_server.target, ClientTls(ca=new_ca[0].cert), mnist_test_set[0])
            == grpc.StatusCode.OK
        )
        assert (
            classify_code(tls_server.target, ClientTls(ca=pki["ca"].cert), mnist_test_set[0])
            == grpc.StatusCode.UNAVAILABLE
        )  # the old CA no longer verifies the server
        https = tls_server.http_url.replace("http://", "https://") + "/v2/health/ready"
        assert (
            http_status(https, context=ssl.create_default_context(cafile=str(new_ca[0].cert)))
            == 200
        )
        assert tls_server.proc.pid == pid and tls_server.proc.poll() is None
        assert "TLS certificate reloaded" in tls_server.log()
        assert "TLS certificate for HTTP reloaded" in tls_server.log()
    finally:  # the other tests of this server expect the first certificate
        _install(tls_server.tls_files, pki["server"])
        assert (
            _first_ok(tls_server.target, ClientTls(ca=pki["ca"].cert), mnist_test_set[0])
            == grpc.StatusCode.OK
        )


def test_mtls_serves_a_client_with_a_certificate_from_its_ca(mtls_server, pki, mnist_test_set):
    good = ClientTls(ca=pki["ca"].cert, cert=pki["client"].cert, key=pki["client"].key)
    assert classify_code(mtls_server.target, good, mnist_test_set[0]) == grpc.StatusCode.OK


@pytest.mark.parametrize("certificate", ["missing", "wrong", "expired"])
def test_mtls_refuses_a_missing_wrong_or_expired_client_certificate(
    mtls_server, pki, mnist_test_set, certificate
):
    issued = {"missing": None, "wrong": pki["wrong_client"], "expired": pki["expired_client"]}[
        certificate
    ]
    tls = ClientTls(
        ca=pki["ca"].cert, cert=issued.cert if issued else None, key=issued.key if issued else None
    )
    assert classify_code(mtls_server.target, tls, mnist_test_set[0]) == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.proc.poll() is None


def test_the_http_port_serves_tls_with_the_same_certificate(tls_server, pki):
    https = tls_server.http_url.replace("http://", "https://") + "/v2/health/ready"
    trusting = ssl.create_default_context(cafile=str(pki["ca"].cert))
    assert http_status(https, context=trusting) == 200
    with pytest.raises(urllib.error.URLError):
        http_status(https, context=ssl.create_default_context(cafile=str(pki["other_ca"].cert)))


def test_the_health_probe_speaks_tls_and_mtls(mtls_server, pki):
    probe = [
        sys.executable,
        "-m",
        "serving.health_probe",
        "--target",
        mtls_server.target,
        "--timeout",
        "10",
    ]
    client = [
        "--tls-ca",
        str(pki["ca"].cert),
        "--tls-cert",
        str(pki["client"].cert),
        "--tls-key",
        str(pki["client"].key),
    ]
    ok = subprocess.run([*probe, *client], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    plain = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stdout, plain.stdout + plain.stderr
