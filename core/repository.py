"""The model repository: where training publishes versions and serving finds them.

Layout (Triton's, so Triton serves it unchanged)::

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/model.onnx
    <repository>/<model>/<version>/metadata.json

This module reads and writes that layout and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from core.contract import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from core.metadata import MetadataError, ModelMetadata

MODEL_FILENAME = "model.onnx"
METADATA_FILENAME = "metadata.json"
CONFIG_FILENAME = "config.pbtxt"


class RepositoryError(Exception):
    """The repository is missing, incomplete or inconsistent; the message says what to do."""


@dataclass(frozen=True)
class ModelVersion:
    """One servable version: its directory, ONNX file and training metadata."""

    name: str
    version: int
    directory: Path
    metadata: ModelMetadata

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILENAME

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    def verify_checksum(self) -> str:
        """Return the model file's sha256, refusing a file that differs from metadata.json's."""
        actual = sha256_of(self.model_path)
        expected = self.metadata.model_sha256
        if expected and expected != actual:
            raise RepositoryError(
                f"{self.model_path}: sha256 {actual[:12]}… does not match metadata.json's "
                f"{expected[:12]}…; the file was changed or truncated: retrain or restore it"
            )
        return actual


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_versions(repository: Path, model_name: str) -> list[int]:
    """Version numbers present under <repository>/<model_name>, ascending."""
    model_dir = Path(repository) / model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load_version(repository: Path, model_name: str, version: int | None = None) -> ModelVersion:
    """Open one version (the newest when `version` is None), checking that it is complete."""
    repository = Path(repository)
    versions = list_versions(repository, model_name)
    if not versions:
        raise RepositoryError(
            f"no versions of model '{model_name}' under {repository}: "
            f"run `mnist-train --out {repository}` first, or point --model-repository at a trained one"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise RepositoryError(
            f"model '{model_name}' has no version {version} under {repository} "
            f"(available: {', '.join(map(str, versions))})"
        )
    directory = repository / model_name / str(version)
    model_path = directory / MODEL_FILENAME
    if not model_path.is_file():
        raise RepositoryError(f"{model_path} is missing: the version is incomplete; retrain it")
    metadata_path = directory / METADATA_FILENAME
    if metadata_path.exists():
        try:
            metadata = ModelMetadata.read(metadata_path)
        except MetadataError as err:
            raise RepositoryError(str(err)) from err
    else:
        # A bare Triton-style version (model.onnx alone): digits, and no checksum to verify.
        metadata = ModelMetadata(model_name=model_name, version=version)
    return ModelVersion(model_name, version, directory, metadata)


def triton_config(model_name: str, max_batch_size: int, preferred_batch_sizes: tuple[int, ...] = ()) -> str:
    """A Triton ModelConfig in protobuf text format for the ONNX classifier."""
    preferred = "".join(f"\n  preferred_batch_size: {size}" for size in preferred_batch_sizes)
    dims = ", ".join(str(d) for d in IMAGE_SHAPE)
    return f"""name: "{model_name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {NUM_CLASSES} ]
  }}
]
dynamic_batching {{{preferred}
  max_queue_delay_microseconds: 0
}}
"""


def write_version(
    repository: Path,
    model_name: str,
    onnx_bytes: bytes,
    metadata: ModelMetadata,
    max_batch_size: int = 64,
) -> ModelVersion:
    """Add the next version (never overwriting one) and (re)write the model's config.pbtxt.

    The model's name, the version number and the file's sha256 are set here, whatever
    `metadata` says. The files are written into a hidden staging directory and renamed into
    place, so a server never sees a half-written version.
    """
    repository = Path(repository)
    model_dir = repository / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = list_versions(repository, model_name)
    version = (existing[-1] + 1) if existing else 1
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir()
    (staging / MODEL_FILENAME).write_bytes(onnx_bytes)
    full_metadata = dataclasses.replace(metadata, model_name=model_name, version=version,
                                        model_sha256=hashlib.sha256(onnx_bytes).hexdigest())
    (staging / METADATA_FILENAME).write_text(full_metadata.to_json())
    staging.rename(model_dir / str(version))
    (model_dir / CONFIG_FILENAME).write_text(triton_config(model_name, max_batch_size))
    return ModelVersion(model_name, version, model_dir / str(version), full_metadata)
