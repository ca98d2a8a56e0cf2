"""Keep a replica's model repository in step with the model images in a registry; run the server.

    python model_sync.py --registry https://registry:5000 --image mnist-model --into /models \
        [--ca FILE] [--interval 5] -- mnist-serve --model-repository /models ...

Each model version is an image in the registry (KServe's "modelcar" packaging: FROM scratch,
`<model>/config.pbtxt` and `<model>/<version>/{model.onnx, metadata.json}`, tagged by the version;
docker/local_swarm.py publish-model makes one). Swarm has neither init containers nor sidecars, so
this one process is both: it fetches every version the registry lists (the Registry HTTP API v2:
tags, manifest, layers), checks each layer against its sha256 digest and model.onnx against
metadata.json's sha256 (core.repository), and renames the version into place only then, so the
server never sees a half-written or altered one. It starts the server once a version is there,
passes SIGTERM and SIGINT on (the server drains), and keeps looking every --interval seconds while
the server runs: the server (poll mode) loads a new version without a restart. It exits with the
server's status. Versions the registry no longer lists stay (a replica keeps what it serves).

Runs inside the server image (the project's `core` is installed there); the stack ships this file
as a Swarm config (deploy/swarm/stack.yml).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.metadata import ModelMetadata
from core.repository import (
    METADATA_FILENAME,
    ModelVersion,
    RepositoryError,
    list_versions,
)

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.manifest.v1+json"
)


@dataclass(frozen=True)
class SyncConfig:
    registry: str  # https://host:port
    image: str  # the model images' repository in the registry, e.g. mnist-model
    into: Path  # the replica's model repository
    model: str = "mnist"
    ca: Path | None = None
    interval: float = 5.0


def say(message: str) -> None:
    print(f"[model-sync] {message}", file=sys.stderr, flush=True)


class Registry:
    """The few Registry HTTP API v2 calls a pull needs."""

    def __init__(self, config: SyncConfig) -> None:
        self.base = config.registry.rstrip("/")
        self.image = config.image
        self.context = ssl.create_default_context(cafile=str(config.ca) if config.ca else None)

    def _get(self, path: str, accept: str = "application/json"):
        request = urllib.request.Request(
            f"{self.base}/v2/{self.image}/{path}", headers={"Accept": accept}
        )
        return urllib.request.urlopen(request, timeout=30, context=self.context)

    def tags(self) -> list[int]:
        """The version tags (digits only), ascending; none while the repository does not exist."""
        try:
            with self._get("tags/list") as answer:
                tags = json.load(answer).get("tags") or []
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return []
            raise
        return sorted(int(tag) for tag in tags if tag.isdigit())

    def layers(self, tag: int) -> list[str]:
        with self._get(f"manifests/{tag}", accept=MANIFEST_TYPES) as answer:
            manifest = json.load(answer)
        return [layer["digest"] for layer in manifest.get("layers", [])]

    def blob(self, digest: str, dest: Path) -> None:
        """Download one layer into `dest`, refusing it unless its sha256 is its digest."""
        algorithm, expected = digest.split(":", 1)
        if algorithm != "sha256":
            raise RepositoryError(f"layer {digest}: only sha256 digests are checked")
        hasher = hashlib.sha256()
        with self._get(f"blobs/{digest}", accept="*/*") as answer, open(dest, "wb") as out:
            for chunk in iter(lambda: answer.read(1 << 20), b""):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != expected:
            raise RepositoryError(
                f"layer {digest[:19]}: downloaded sha256 {hasher.hexdigest()[:12]} "
                f"differs: the transfer was altered; it is fetched again next time"
            )


def _extract(layer: Path, into: Path) -> None:
    with tarfile.open(layer) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise RepositoryError(
                    f"layer entry {member.name!r}: only plain files and folders "
                    f"inside the image are accepted"
                )
        tar.extractall(into)  # checked above: Debian's Python 3.11.2 has no extraction filters


def fetch_version(config: SyncConfig, registry: Registry, version: int) -> None:
    """Fetch one version into a staging folder, check it, then rename it into place."""
    model_dir = config.into / config.model
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.into, prefix=".sync-") as staging:
        staging = Path(staging)
        for number, digest in enumerate(registry.layers(version)):
            layer = staging / f"layer{number}.tar"
            registry.blob(digest, layer)
            _extract(layer, staging / "root")
            layer.unlink()
        fetched = staging / "root" / config.model / str(version)
        if not (fetched / METADATA_FILENAME).is_file():
            raise RepositoryError(
                f"model image {config.image}:{version} holds no "
                f"{config.model}/{version}/{METADATA_FILENAME}: publish it with "
                f"docker/local_swarm.py publish-model"
            )
        metadata = ModelMetadata.read(fetched / METADATA_FILENAME)
        digest = ModelVersion(config.model, version, fetched, metadata).verify_checksum()
        config_file = staging / "root" / config.model / "config.pbtxt"
        if config_file.is_file():
            config_file.replace(model_dir / "config.pbtxt")  # the same file system: atomic
        fetched.rename(model_dir / str(version))
    say(
        f"{config.model} version {version} in place "
        f"(model.onnx sha256 {digest[:12]}, as metadata.json says)"
    )


def sync_once(config: SyncConfig, registry: Registry) -> None:
    present = set(list_versions(config.into, config.model))
    for version in registry.tags():
        if version not in present:
            fetch_version(config, registry, version)


def run(config: SyncConfig, command: list[str]) -> int:
    registry = Registry(config)
    waiting_since = time.monotonic()
    while True:  # the server needs one version to start
        try:
            sync_once(config, registry)
        except (OSError, ValueError, RepositoryError) as error:
            say(f"cannot sync from {config.registry}/{config.image} yet: {error}")
        if list_versions(config.into, config.model):
            break
        say(
            f"no version of {config.model} in {config.registry}/{config.image} yet "
            f"({time.monotonic() - waiting_since:.0f} s): waiting"
        )
        time.sleep(config.interval)
    server = subprocess.Popen(command)

    def forward(signum, _frame) -> None:
        server.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return server.wait(timeout=config.interval)
        except subprocess.TimeoutExpired:
            pass
        try:
            sync_once(config, registry)
        except (OSError, ValueError, RepositoryError) as error:  # keep serving what is here
            say(f"sync from {config.registry}/{config.image} failed, will retry: {error}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("model_sync.py: give the server's command after --", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="model_sync.py", description=__doc__.split("\n")[0])
    parser.add_argument("--registry", required=True, help="https://host:port of the registry")
    parser.add_argument("--image", default="mnist-model", help="the model images' repository")
    parser.add_argument("--model", default="mnist", help="the model's folder name")
    parser.add_argument("--into", type=Path, default=Path("/models"))
    parser.add_argument(
        "--ca", type=Path, default=None, help="CA bundle the registry's certificate is signed by"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between two looks")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        print("model_sync.py: give the server's command after --", file=sys.stderr)
        return 2
    ca = args.ca if args.ca and args.ca.exists() else None
    config = SyncConfig(args.registry, args.image, args.into, args.model, ca, args.interval)
    config.into.mkdir(parents=True, exist_ok=True)
    return run(config, command)


if __name__ == "__main__":
    sys.exit(main())
