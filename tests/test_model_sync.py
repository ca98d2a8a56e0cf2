"""deploy/swarm/model_sync.py against a real registry on loopback (no engine, no cluster): what
keeps a swarm replica's model repository in step with the model images (docs/swarm.md)."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest

from tests.support.common import ROOT
from tests.support.engine import CI
from tests.support.model_image import loopback_registry, push_model_image


def _model_sync():
    spec = importlib.util.spec_from_file_location("model_sync", ROOT / "deploy/swarm/model_sync.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _push_good_and_altered(base: str, trained_repository) -> bytes:
    """Version 1 as trained; version 2 with one flipped byte, so the sha256 in its metadata.json
    no longer matches. Returns version 1's model.onnx."""
    version_dir = trained_repository / "mnist" / "1"
    onnx = (version_dir / "model.onnx").read_bytes()
    metadata = (version_dir / "metadata.json").read_text()
    push_model_image(
        base,
        "mnist-model",
        "1",
        {
            "mnist/1/model.onnx": onnx,
            "mnist/1/metadata.json": metadata.encode(),
            "mnist/config.pbtxt": (trained_repository / "mnist" / "config.pbtxt").read_bytes(),
        },
    )
    altered = bytearray(onnx)
    altered[-1] ^= 0xFF
    push_model_image(
        base,
        "mnist-model",
        "2",
        {
            "mnist/2/model.onnx": bytes(altered),
            "mnist/2/metadata.json": metadata.replace('"version": 1', '"version": 2').encode(),
        },
    )
    return onnx


def test_model_sync_fetches_checked_versions_and_refuses_an_altered_one(
    trained_repository, tmp_path
):
    """deploy/swarm/model_sync.py against Debian's docker-registry on loopback: a version whose
    model.onnx matches metadata.json's sha256 lands in the repository; one that does not is refused
    and never appears there, and the sync keeps the good one."""
    if shutil.which("docker-registry") is None:
        if CI:
            pytest.fail(
                "no docker-registry: under CI=true this test must run (.ci/run installs it)"
            )
        pytest.skip("no docker-registry on PATH (Debian: apt-get install docker-registry)")
    with loopback_registry(tmp_path) as base:
        onnx = _push_good_and_altered(base, trained_repository)
        sync = _model_sync()
        into = tmp_path / "models"
        settings = sync.SyncConfig(base, "mnist-model", into)
        client = sync.Registry(settings)
        assert client.tags() == [1, 2]
        with pytest.raises(sync.RepositoryError, match="does not match metadata.json"):
            sync.sync_once(settings, client)
        assert (into / "mnist" / "1" / "model.onnx").read_bytes() == onnx
        assert (into / "mnist" / "config.pbtxt").exists()
        assert not (into / "mnist" / "2").exists()
        assert [p.name for p in into.iterdir() if p.name.startswith(".sync-")] == []
