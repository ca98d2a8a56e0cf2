"""The REST client over HTTPS (mTLS) with a bearer token, on a real server: served with both,
401 without the right token (health stays open), no connection without a client certificate, and
mnist-predict and Locust passing the TLS and token options."""

from __future__ import annotations

import numpy as np
import pytest

from serving.client import ClientTls
from serving.process import start_server
from serving.rest_client import RestClient, RestError
from tests.support.common import predict_args, run_predict
from tests.support.lifecycle import Reference
from tests.support.pki import TOKEN, issue, make_ca, tls_args

SERVER_ARGS = ("--workers", "1")


@pytest.fixture(scope="module")
def secured(trained_repository, tmp_path_factory):
    """A server with TLS, client certificates from its CA required (mTLS), and a bearer token."""
    folder = tmp_path_factory.mktemp("rest-secured")
    ca = make_ca(folder, "ca")
    server_cert, client_cert = (
        issue(folder, "server", ca, server=True),
        issue(folder, "client", ca, server=False),
    )
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    tls = ClientTls(ca=ca[0].cert, cert=client_cert.cert, key=client_cert.key)
    with start_server(
        trained_repository,
        *SERVER_ARGS,
        *tls_args(server_cert, ca[0].cert),
        "--auth-token-file",
        str(token_file),
        log_path=folder / "server.log",
        tls=tls,
    ) as server:
        server.client_tls, server.token_file = tls, token_file
        yield server


def test_rest_client_over_mtls_with_the_token_is_served(
    secured, mnist_test_set, trained_repository
):
    images, _ = mnist_test_set
    with RestClient(f"127.0.0.1:{secured.http_port}", tls=secured.client_tls, token=TOKEN) as rest:
        probabilities, model, version = rest.infer_answer(images[:8])
        index = rest.json_call("POST", "/v2/repository/index")
    expected = Reference()(trained_repository / model / version / "model.onnx", images[:8])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert {m["name"]: m["state"] for m in index}["mnist"] == "READY"


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_rest_calls_without_the_right_token_are_401(secured, mnist_test_set, token):
    with RestClient(f"127.0.0.1:{secured.http_port}", tls=secured.client_tls, token=token) as rest:
        with pytest.raises(RestError) as refused:
            rest.infer(mnist_test_set[0][:1])
        assert refused.value.status == 401 and "bearer token" in refused.value.message
        for method, path in (
            ("POST", "/v2/repository/index"),
            ("GET", "/v2/models/mnist/config"),
            ("GET", "/v2/models/stats"),
            ("POST", "/v2/repository/models/mnist/unload"),
        ):
            assert rest.request(method, path).status == 401, path
        assert rest.is_ready()  # health stays open


def test_rest_client_without_a_client_certificate_cannot_connect(secured, mnist_test_set):
    with RestClient(
        f"127.0.0.1:{secured.http_port}", tls=ClientTls(ca=secured.client_tls.ca), token=TOKEN
    ) as rest:
        with pytest.raises(OSError):  # the handshake (ssl.SSLError) or the connection it closes
            rest.infer(mnist_test_set[0][:1])


def test_mnist_predict_rest_passes_the_tls_and_token_options(secured, mnist_path):
    tls = secured.client_tls
    base = (
        *("--api", "rest"),
        *predict_args(f"127.0.0.1:{secured.http_port}", mnist_path, 20),
        *(
            "--quiet",
            "--tls-ca",
            str(tls.ca),
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
        ),
    )
    ok = run_predict(*base, "--auth-token-file", str(secured.token_file))
    assert ok.returncode == 0 and ok.stdout.startswith("accuracy: "), ok.stderr
    no_token = run_predict(*base)
    assert no_token.returncode == 1 and "HTTP 401" in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1, no_token.stderr


def test_locust_rest_scenario_passes_the_tls_and_token_options(secured, mnist_path, tmp_path):
    from loadtest.locust_args import rest_request_name
    from loadtest.locust_runner import run_locust

    tls = secured.client_tls
    run = run_locust(
        secured.target,
        scenario="rest",
        users=2,
        spawn_rate=2,
        run_time="4s",
        csv_prefix=tmp_path / "locust",
        log_path=tmp_path / "locust.log",
        extra=[
            "--http-host",
            f"127.0.0.1:{secured.http_port}",
            "--mnist-dir",
            str(mnist_path),
            "--pool-size",
            "200",
            "--tls-ca",
            str(tls.ca),
            "--client-tls-cert",
            str(tls.cert),
            "--client-tls-key",
            str(tls.key),
            "--auth-token-file",
            str(secured.token_file),
        ],
    )
    rest = run.stats[rest_request_name()]
    assert run.returncode == 0 and run.failures == [], (
        run.failures,
        (tmp_path / "locust.log").read_text()[-2000:],
    )
    assert rest.requests > 0 and rest.failures == 0
