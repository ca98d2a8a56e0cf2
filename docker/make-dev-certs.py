"""Development certificates and a bearer token for `docker compose -f docker-compose.yml -f docker-compose.tls.yml`.

    python docker/make-dev-certs.py                 # writes ./certs (git-ignored)
    python docker/make-dev-certs.py --san my-host   # also valid for another name or address

Writes into the folder (README: "TLS in Compose"):
    ca.crt                  the CA that signed both certificates: servers trust clients by it, clients servers
    server.crt, server.key  for `server`, `envoy`, `localhost` and 127.0.0.1 (+ --san): the replicas and Envoy
    client.crt, client.key  the one client certificate: Envoy to the replicas, the healthchecks, Locust, you
    token                   the bearer token (--auth-token-file)
The CA's key is not kept: nothing else is ever signed by it; run again with --force for a new set.

For development only. Production brings its own certificates (an internal CA, cert-manager...)
and its own token, in the same file names, in the folder CERTS_DIR names.
Needs the `cryptography` package (the project's dev extra: `make install`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

# The names compose's services reach each other by, and the host's: see docker-compose.tls.yml.
DEFAULT_NAMES = ("server", "envoy", "localhost", "127.0.0.1")
FILES = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key", "token")
# The containers run as uid 1000 and read these files through a bind mount, whoever made them on the
# host: so they are readable by all. Fine for throw-away development keys, not for real ones.
FILE_MODE = 0o644


@dataclass(frozen=True)
class DevCertsConfig:
    out: Path
    names: tuple[str, ...]  # DNS names and IP addresses the server certificate is valid for
    days: int
    force: bool


def parse_args(argv: list[str] | None = None) -> DevCertsConfig:
    parser = argparse.ArgumentParser(prog="make-dev-certs", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("certs"), help="folder to write (default: ./certs)"
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the server certificate (repeatable)",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="validity of the certificates (default: 365)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace the files if the folder holds them"
    )
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    names = tuple(dict.fromkeys((*DEFAULT_NAMES, *args.san)))  # in order, no repeats
    return DevCertsConfig(args.out, names, args.days, args.force)


def _subject_alt_name(names: tuple[str, ...]):
    from cryptography import x509

    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_dev_certs(names: tuple[str, ...], days: int) -> dict[str, bytes]:
    """File name -> contents: a CA, a server certificate for `names`, a client certificate, a token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    validity = (now - dt.timedelta(hours=1), now + dt.timedelta(days=days))  # an hour of clock skew
    ca_key, ca_cert = _certificate_authority(validity)
    server_cert, server_key = _leaf(
        ca_key,
        ca_cert,
        names[0],
        ExtendedKeyUsageOID.SERVER_AUTH,
        _subject_alt_name(names),
        validity,
    )
    client_cert, client_key = _leaf(
        ca_key, ca_cert, "mnist-client", ExtendedKeyUsageOID.CLIENT_AUTH, None, validity
    )
    return {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.crt": server_cert,
        "server.key": server_key,
        "client.crt": client_cert,
        "client.key": client_key,
        "token": (secrets.token_urlsafe(32) + "\n").encode(),
    }


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject, issuer, public_key, validity: tuple[dt.datetime, dt.datetime], ca: bool):
    """What every certificate here has: names, key, a random serial, validity, basic constraints."""
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )


def _certificate_authority(validity: tuple[dt.datetime, dt.datetime]):
    """(key, certificate) of a CA that may sign certificates, not other CAs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("mnist-cnn-serving dev CA")
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = _builder(name, name, key.public_key(), validity, ca=True)
    return key, builder.add_extension(usage, critical=True).sign(key, hashes.SHA256())


def _leaf(ca_key, ca_cert, common_name: str, usage, san, validity) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by the CA, for one extended key usage."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(common_name), ca_cert.subject, key.public_key(), validity, ca=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem


def write_files(out: Path, files: dict[str, bytes], force: bool) -> None:
    present = [file for file in files if (out / file).exists()]
    if present and not force:
        raise FileExistsError(f"{out} already holds {', '.join(present)}: --force replaces them")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    for file, content in files.items():
        path = out / file
        path.write_bytes(content)
        path.chmod(FILE_MODE)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        files = make_dev_certs(config.names, config.days)
        write_files(config.out, files, config.force)
    except ImportError:
        print(
            "make-dev-certs: error: needs the cryptography package (pip install cryptography, or make install)",
            file=sys.stderr,
        )
        return 1
    except OSError as error:  # FileExistsError included: one line, not a traceback
        print(f"make-dev-certs: error: {error}", file=sys.stderr)
        return 1
    print(
        f"make-dev-certs: wrote {', '.join(files)} to {config.out} "
        f"(server certificate for {', '.join(config.names)}; valid {config.days} days)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
