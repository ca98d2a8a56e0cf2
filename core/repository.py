"""The model repository: where training publishes versions and serving finds them.

Layout (Triton's, so Triton serves it unchanged)::

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/model.onnx
    <repository>/<model>/<version>/metadata.json

This module reads and writes that layout and nothing else.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
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


def no_versions_message(repository: Path, model_name: str | None = None) -> str:
    """What to say when there is nothing to serve: no versions of `model_name` (None: of any model)."""
    what = f"model '{model_name}'" if model_name else "models"
    return (
        f"no versions of {what} under {repository}: run `mnist-train --out {repository}` first, "
        "or point --model-repository at a trained one"
    )


def load_version(repository: Path, model_name: str, version: int | None = None) -> ModelVersion:
    """Open one version (the newest when `version` is None), checking that it is complete."""
    repository = Path(repository)
    versions = list_versions(repository, model_name)
    if not versions:
        raise RepositoryError(no_versions_message(repository, model_name))
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


def triton_config(
    model_name: str, max_batch_size: int, preferred_batch_sizes: tuple[int, ...] = ()
) -> str:
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
    `metadata` says. Every file is written and flushed to disk in hidden places first (a staging
    folder, a temporary config), then renamed into place, which needs no free space: a server
    never sees a half-written version, and a write that fails (a full disk) removes what it
    wrote and raises RepositoryError: nothing is published.
    """
    repository = Path(repository)
    model_dir = repository / model_name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RepositoryError(
            f"cannot publish model '{model_name}' under {repository}: {_why(err)}"
        ) from err
    existing = list_versions(repository, model_name)
    version = (existing[-1] + 1) if existing else 1
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    config_staging = model_dir / f".{CONFIG_FILENAME}.{os.getpid()}.tmp"
    full_metadata = dataclasses.replace(
        metadata,
        model_name=model_name,
        version=version,
        model_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
    )
    try:
        staging.mkdir()
        _write_flushed(staging / MODEL_FILENAME, onnx_bytes)
        _write_flushed(staging / METADATA_FILENAME, full_metadata.to_json().encode())
        _write_flushed(config_staging, triton_config(model_name, max_batch_size).encode())
        staging.rename(model_dir / str(version))  # the version appears whole, or not at all
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        config_staging.unlink(missing_ok=True)
        raise RepositoryError(
            f"cannot publish model '{model_name}' version {version} under {repository}: {_why(err)}; "
            "nothing was published (the partial files were removed)"
        ) from err
    try:
        os.replace(config_staging, model_dir / CONFIG_FILENAME)
        _sync_directory(model_dir)
    except OSError as err:
        config_staging.unlink(missing_ok=True)
        raise RepositoryError(
            f"model '{model_name}' version {version} was published under {repository}, but its "
            f"{CONFIG_FILENAME} could not be rewritten: {_why(err)}"
        ) from err
    return ModelVersion(model_name, version, model_dir / str(version), full_metadata)


def _write_flushed(path: Path, data: bytes) -> None:
    """Write a new file and flush it to disk: a full disk fails here, not after a rename."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(directory: Path) -> None:
    """Make the renames inside `directory` durable (where directories can be opened: not Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(descriptor)


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on device: free space (or publish elsewhere with --out) and run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror.lower()}: publish where this user can write (--out)"
    return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
