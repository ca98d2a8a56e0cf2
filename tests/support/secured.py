"""Fixtures and helpers of the TLS and token tests: certificates made at test time
(tests/support/pki.py) and servers that use them.

Registered as a plugin in tests/conftest.py."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest

from serving.client import ClassifierClient, ClientTls
from serving.process import start_server
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


@pytest.fixture(scope="module")
def token_server(trained_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("token")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    with start_server(
        trained_repository,
        *("--workers", "1", "--auth-token-file", str(token_file)),
        log_path=folder / "server.log",
    ) as running:
        running.token_file = token_file
        yield running


def http_status(url: str, token: str | None = None, context=None) -> int:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
