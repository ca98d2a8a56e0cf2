"""Transport security's files in-process: the one watched-file helper, the token, the HTTPS context.

Real files, real certificates (tests/support/pki) and real TLS handshakes through OpenSSL, in
memory (ssl.MemoryBIO): no socket, no server. The ports themselves are test_tls.py's.
"""

from __future__ import annotations

import logging
import ssl

import pytest

from serving.http_api import security as http_security
from serving.inference.errors import Unauthenticated
from serving.security import (
    SecurityConfigError,
    TlsFiles,
    TokenFile,
    WatchedFiles,
    bearer_token,
    read_file,
)
from tests.support.pki import issue, make_ca


def test_watched_files_follow_a_change_and_keep_the_last_usable_state(tmp_path, caplog):
    path = tmp_path / "value"
    path.write_text("one")
    watched = WatchedFiles([path], lambda: read_file(path, "--value").decode(), "the value")
    assert watched.current() == ("one", False)
    path.write_text("two, longer")
    assert watched.current() == ("two, longer", True)
    assert watched.current() == ("two, longer", False)  # reloaded once, not on every look
    with caplog.at_level(logging.WARNING, logger="mnist-serve"):
        path.write_text("   ")  # half-written: unusable
        assert watched.current() == ("two, longer", False)
    assert (
        "the value files changed but cannot be used yet" in caplog.text
        and "is empty" in caplog.text
    )
    path.unlink()
    assert watched.current() == ("two, longer", False)
    path.write_text("three")
    assert watched.current() == ("three", True) and watched.reloads == 2


def test_a_first_load_that_fails_is_one_clear_error(tmp_path):
    with pytest.raises(SecurityConfigError, match=r"cannot read --auth-token-file .*missing"):
        TokenFile(tmp_path / "missing")
    (tmp_path / "two").write_text("one two\n")
    with pytest.raises(SecurityConfigError, match="must hold one token"):
        TokenFile(tmp_path / "two")


def test_the_token_check_says_what_to_send_and_compares_the_whole_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    token = TokenFile(path)
    token.check(b"s3cret", "the header X")
    with pytest.raises(Unauthenticated, match="needs a bearer token: send the header X"):
        token.check(None, "the header X")
    for wrong in (b"s3cre", b"s3cret!", b""):
        with pytest.raises(Unauthenticated, match="not valid for this server"):
            token.check(wrong, "the header X")
    assert bearer_token([("Authorization", "Bearer  abc ")]) == b"abc"
    assert bearer_token([("authorization", b"bearer abc")]) == b"abc"
    assert bearer_token([("authorization", "Basic abc")]) is None and bearer_token(None) is None


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    """One TLS handshake between the two contexts, in memory; raises what the client's side raises."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(client_out.read())
        client_in.write(to_client.read())
        if all(done.values()):
            return
    raise AssertionError(f"the handshake did not finish: {done}")


def test_the_https_context_serves_a_renewed_certificate_at_the_next_handshake(tmp_path):
    old_ca, new_ca = make_ca(tmp_path, "old-ca"), make_ca(tmp_path, "new-ca")
    old, renewed = (
        issue(tmp_path, "old", old_ca, server=True),
        issue(tmp_path, "renewed", new_ca, server=True),
    )
    files = TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key")

    def install(cert, key) -> None:
        files.cert.write_bytes(cert.cert.read_bytes())
        files.key.write_bytes(key.key.read_bytes())

    install(old, old)
    context = http_security.ssl_context(files)
    trusts_old = ssl.create_default_context(cafile=str(old_ca[0].cert))
    trusts_new = ssl.create_default_context(cafile=str(new_ca[0].cert))
    handshake(context, trusts_old)
    install(renewed, old)  # half-written: the renewed certificate beside the old key
    handshake(context, trusts_old)  # the previous pair still serves
    install(renewed, renewed)
    handshake(context, trusts_new)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, trusts_old)  # the old CA no longer verifies the server
