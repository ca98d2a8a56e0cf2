"""TLS, mutual TLS and bearer tokens on the real server, with certificates made at test time.

A CA signs the server's certificate (for 127.0.0.1) and the good client's; another CA signs the
wrong client's; the expired client certificate is the right CA's but out of date. Each refusal
must come with the right status: a handshake that fails is UNAVAILABLE on the client, a call
without the right token is UNAUTHENTICATED, and health and metrics stay open.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import ClassifierClient, ClientTls
from serving.process import free_port, start_server
from tests.support.pki import TOKEN, Issued, issue, make_ca, tls_args


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    return {
        "ca": ca[0],
        "other_ca": other_ca[0],
        "server": issue(folder, "server", ca, server=True),
        "expired_server": issue(folder, "expired-server", ca, server=True, expired=True),
        "client": issue(folder, "client", ca, server=False),
        "wrong_client": issue(folder, "wrong-client", other_ca, server=False),
        "expired_client": issue(folder, "expired-client", ca, server=False, expired=True),
        "folder": folder,
        "ca_full": ca,
        "other_ca_full": other_ca,
    }


def classify_code(
    target: str, tls: ClientTls | None, images, token: str | None = None
) -> grpc.StatusCode:
    with ClassifierClient(target, timeout=10, tls=tls, token=token) as client:
        try:
            client.classify(images[:2])
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


@pytest.fixture(scope="module")
def tls_server(trained_repository, pki, tmp_path_factory):
    """TLS with the server's files copied to a folder of their own, which the reload test rewrites."""
    folder = tmp_path_factory.mktemp("server-tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(pki["server"].cert.read_bytes())
    key.write_bytes(pki["server"].key.read_bytes())
    with start_server(
        trained_repository,
        "--workers",
        "1",
        *tls_args(Issued(cert, key)),
        log_path=folder / "server.log",
        tls=ClientTls(ca=pki["ca"].cert),
    ) as running:
        running.tls_files = Issued(cert, key)
        yield running


@pytest.fixture(scope="module")
def mtls_server(trained_repository, pki, tmp_path_factory):
    log = tmp_path_factory.mktemp("mtls") / "server.log"
    good = ClientTls(ca=pki["ca"].cert, cert=pki["client"].cert, key=pki["client"].key)
    with start_server(
        trained_repository,
        "--workers",
        "1",
        *tls_args(pki["server"], pki["ca"].cert),
        log_path=log,
        tls=good,
    ) as running:
        yield running


# --- TLS ----------------------------------------------------------------------------------------


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


# --- mutual TLS ---------------------------------------------------------------------------------


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


# --- bearer tokens ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(trained_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("token")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--auth-token-file",
        str(token_file),
        log_path=folder / "server.log",
    ) as running:
        running.token_file = token_file
        yield running


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_inference_without_the_right_token_is_unauthenticated(token_server, mnist_test_set, token):
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], token)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    with ClassifierClient(token_server.target, token=token) as client:
        for call in (lambda: client.infer_kserve(mnist_test_set[0][:1]), client.describe):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()


def test_the_right_token_is_served_and_health_and_metrics_stay_open(token_server, mnist_test_set):
    assert classify_code(token_server.target, None, mnist_test_set[0], TOKEN) == grpc.StatusCode.OK
    with ClassifierClient(token_server.target, token=TOKEN) as client:
        assert client.infer_kserve(mnist_test_set[0][:1]).shape == (1, 10)
    with grpc.insecure_channel(token_server.target) as channel:  # no token at all
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=None,
            response_deserializer=None,
        )(b"", timeout=10)
        assert live == b"\x08\x01"  # ServerLiveResponse(live=True)
    # Refusals are counted like any call; /metrics needs no token.
    assert (
        classify_code(token_server.target, None, mnist_test_set[0])
        == grpc.StatusCode.UNAUTHENTICATED
    )
    metrics = urllib.request.urlopen(token_server.metrics_url, timeout=5).read().decode()
    assert 'method="Classify"' in metrics and 'code="UNAUTHENTICATED"' in metrics


def test_a_rotated_token_is_read_without_a_restart(token_server, mnist_test_set):
    token_server.token_file.write_text("rotated-token\n")
    deadline = time.monotonic() + 10
    while (
        classify_code(token_server.target, None, mnist_test_set[0], "rotated-token")
        != grpc.StatusCode.OK
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], "rotated-token")
        == grpc.StatusCode.OK
    )
    assert (
        classify_code(token_server.target, None, mnist_test_set[0], TOKEN)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    token_server.token_file.write_text(TOKEN + "\n")  # back, for the other tests of this server
    deadline = time.monotonic() + 10
    while (
        classify_code(token_server.target, None, mnist_test_set[0], TOKEN) != grpc.StatusCode.OK
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)


# --- the CLI and start-up errors ----------------------------------------------------------------


def test_mnist_predict_over_mtls_with_a_token(trained_repository, pki, mnist_path, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    good = ClientTls(ca=pki["ca"].cert, cert=pki["client"].cert, key=pki["client"].key)
    with start_server(
        trained_repository,
        "--workers",
        "1",
        *tls_args(pki["server"], pki["ca"].cert),
        "--auth-token-file",
        str(token_file),
        log_path=tmp_path / "server.log",
        tls=good,
    ) as server:
        base = [
            sys.executable,
            "-m",
            "serving.predict_cli",
            "--target",
            server.target,
            "--mnist-test",
            "20",
            "--data-dir",
            str(mnist_path),
            "--quiet",
            "--tls-ca",
            str(pki["ca"].cert),
        ]
        client_cert = ["--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]
        ok = subprocess.run(
            [*base, *client_cert, "--auth-token-file", str(token_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ok.returncode == 0, ok.stderr
        no_token = subprocess.run(
            [*base, *client_cert], capture_output=True, text=True, timeout=120
        )
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        assert len(no_token.stderr.strip().splitlines()) == 1, no_token.stderr
        no_cert = subprocess.run(
            [*base, "--auth-token-file", str(token_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr


@pytest.mark.parametrize("case", ["cert without key", "missing file", "key of another certificate"])
def test_bad_tls_files_stop_the_server_with_one_line(trained_repository, pki, tmp_path, case):
    args = {
        "cert without key": ["--tls-cert", str(pki["server"].cert)],
        "missing file": [
            "--tls-cert",
            str(tmp_path / "nope.pem"),
            "--tls-key",
            str(pki["server"].key),
        ],
        "key of another certificate": [
            "--tls-cert",
            str(pki["server"].cert),
            "--tls-key",
            str(pki["client"].key),
        ],
    }[case]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "--model-repository",
            str(trained_repository),
            "--workers",
            "1",
            "--port",
            str(free_port()),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (1, 2), result.stderr
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if line.startswith("mnist-serve: error:")
    ]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--tls" in lines[0], lines[0]


# --- the HTTP port: the same TLS files and the same token rule -----------------------------------


def http_status(url: str, token: str | None = None, context=None) -> int:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_http_port_serves_tls_with_the_same_certificate(tls_server, pki):
    https = tls_server.http_url.replace("http://", "https://") + "/v2/health/ready"
    trusting = ssl.create_default_context(cafile=str(pki["ca"].cert))
    assert http_status(https, context=trusting) == 200
    with pytest.raises(urllib.error.URLError):
        http_status(https, context=ssl.create_default_context(cafile=str(pki["other_ca"].cert)))


def test_the_http_port_needs_the_token_for_models_but_not_for_health(token_server):
    base = token_server.http_url
    assert http_status(base + "/v2/models/mnist") == 401
    assert http_status(base + "/v2/models/mnist", "wrong-token") == 401
    assert http_status(base + "/v2/models/mnist", TOKEN) == 200
    assert http_status(base + "/v2/health/ready") == 200
    assert http_status(base + "/v2/models/mnist/ready") == 200


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
