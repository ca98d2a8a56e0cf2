"""A model image (FROM scratch: KServe's "modelcar") pushed straight through the Registry HTTP
API, as `docker push` sends one: what tests/test_model_sync.py feeds model_sync.py with."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _upload(base: str, name: str, blob: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    start = urllib.request.Request(f"{base}/v2/{name}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start, timeout=30) as answer:
        location = answer.headers["Location"]
    location = location if location.startswith("http") else base + location
    joiner = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{joiner}digest={digest}",
        data=blob,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(put, timeout=30).close()
    return digest


def _layer(files: dict[str, bytes]) -> bytes:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(layer.getvalue())


def push_model_image(base: str, name: str, tag: str, files: dict[str, bytes]) -> None:
    """One layer holding `files` (path -> content), its config and manifest, tagged `tag`."""
    layer_blob = _layer(files)
    config_blob = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config_blob),
                "digest": _upload(base, name, config_blob),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer_blob),
                    "digest": _upload(base, name, layer_blob),
                }
            ],
        }
    ).encode()
    put = urllib.request.Request(
        f"{base}/v2/{name}/manifests/{tag}",
        data=manifest,
        method="PUT",
        headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    urllib.request.urlopen(put, timeout=30).close()


def answers(base: str) -> bool:
    """The registry at `base` answers its API's root."""
    try:
        urllib.request.urlopen(f"{base}/v2/", timeout=2).close()
        return True
    except OSError:
        return False


@contextmanager
def loopback_registry(folder: Path) -> Iterator[str]:
    """Debian's docker-registry (the Distribution registry) on loopback, storing under `folder`;
    yields its base URL once it answers."""
    from serving.process import free_port

    port = free_port()
    config = folder / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {"filesystem": {"rootdirectory": str(folder / "store")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    registry = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not answers(base):
            assert time.monotonic() < deadline, "the registry: not so after 60 s"
            time.sleep(0.3)
        yield base
    finally:
        registry.terminate()
        registry.wait(timeout=30)
