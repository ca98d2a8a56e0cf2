"""TLS from the command line: mnist-predict over mTLS with a token, and bad TLS files that stop the
server with one line."""

from __future__ import annotations

import pytest

from serving.client import ClientTls
from serving.process import start_server
from tests.support.common import predict_args, run_predict
from tests.support.pki import TOKEN, tls_args
from tests.support.serving import serve_and_fail


def test_mnist_predict_over_mtls_with_a_token(trained_repository, pki, mnist_path, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    good = ClientTls(ca=pki["ca"].cert, cert=pki["client"].cert, key=pki["client"].key)
    with start_server(
        trained_repository,
        *tls_args(pki["server"], pki["ca"].cert),
        *("--workers", "1", "--auth-token-file", str(token_file)),
        log_path=tmp_path / "server.log",
        tls=good,
    ) as server:
        base = (
            *predict_args(server.target, mnist_path, 20),
            *("--quiet", "--tls-ca", str(pki["ca"].cert)),
        )
        client_cert = ["--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]
        ok = run_predict(*base, *client_cert, "--auth-token-file", str(token_file))
        assert ok.returncode == 0, ok.stderr
        no_token = run_predict(*base, *client_cert)
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        assert len(no_token.stderr.strip().splitlines()) == 1, no_token.stderr
        no_cert = run_predict(*base, "--auth-token-file", str(token_file))
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
    result = serve_and_fail(
        "--model-repository", str(trained_repository), "--workers", "1", *args, timeout=120
    )
    assert result.returncode in (1, 2), result.stderr
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if line.startswith("mnist-serve: error:")
    ]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--tls" in lines[0], lines[0]
