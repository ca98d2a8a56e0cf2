"""core: the tensor contract, the typed metadata.json, and where data sets are found."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import contract
from core.idx import find_data_dir
from core.metadata import SCHEMA_VERSION, MetadataError, ModelMetadata
from core.repository import RepositoryError, load_version, write_version

# What mnist-train wrote before metadata.json had a schema_version (the layout of version 1).
LEGACY_METADATA = {
    "architecture": "article_cnn",
    "class_names": [str(d) for d in range(10)],
    "dataset": "mnist",
    "history": {"loss": [0.5]},
    "hyperparameters": {"epochs": 1},
    "input": {"name": "images"},
    "model_name": "mnist",
    "model_sha256": "ab" * 32,
    "opset": 17,
    "recipe": "article",
    "test_accuracy": 0.97,
    "trained_at": "2025-01-01T00:00:00+00:00",
    "version": 3,
}


def test_scaling_divides_by_255_exactly():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    scaled = contract.scale_pixels(pixels)
    assert scaled.dtype == np.float32 and scaled[0, 0] == 0.0 and scaled[-1, -1] == 1.0
    assert np.array_equal(scaled, pixels.astype(np.float32) / np.float32(255.0))
    batch = contract.to_model_input(np.zeros((3, 28, 28), dtype=np.uint8))
    assert batch.shape == (3, *contract.IMAGE_SHAPE) and batch.dtype == contract.INPUT_DTYPE


def test_a_file_without_schema_version_reads_as_version_1():
    meta = ModelMetadata.from_json(json.dumps({**LEGACY_METADATA, "future_field": [1, 2]}))
    assert meta.schema_version == 1 and meta.version == 3 and meta.test_accuracy == 0.97
    assert meta.extra == {"future_field": [1, 2]}  # kept, so the file round-trips
    written = json.loads(meta.to_json())
    assert {key: written[key] for key in LEGACY_METADATA} == LEGACY_METADATA and written[
        "future_field"
    ] == [1, 2]
    assert meta.scalars()["recipe"] == "article" and "history" not in meta.scalars()


def test_round_trip_writes_the_schema_version():
    meta = ModelMetadata(model_name="mnist", version=1, model_sha256="00" * 32, test_accuracy=0.5)
    again = ModelMetadata.from_json(meta.to_json())
    assert again == meta and json.loads(meta.to_json())["schema_version"] == SCHEMA_VERSION


def test_unknown_schema_version_and_missing_fields_name_the_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({**LEGACY_METADATA, "schema_version": 99}))
    with pytest.raises(
        MetadataError, match=rf"{path}: schema_version 99 is not one this code reads"
    ):
        ModelMetadata.read(path)
    path.write_text(json.dumps({k: v for k, v in LEGACY_METADATA.items() if k != "model_sha256"}))
    with pytest.raises(MetadataError, match=rf"{path}: missing field\(s\) model_sha256"):
        ModelMetadata.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(MetadataError, match="expected a JSON object"):
        ModelMetadata.read(path)


def test_the_repository_writes_and_reads_typed_metadata(tmp_path):
    written = write_version(tmp_path, "mnist", b"not really onnx", ModelMetadata(recipe="article"))
    assert (written.version, written.metadata.model_name, written.metadata.version) == (
        1,
        "mnist",
        1,
    )
    loaded = load_version(tmp_path, "mnist")
    assert (
        loaded.metadata == written.metadata
        and loaded.verify_checksum() == written.metadata.model_sha256
    )
    (loaded.directory / "metadata.json").write_text(
        json.dumps({**LEGACY_METADATA, "schema_version": 2})
    )
    with pytest.raises(RepositoryError, match="schema_version 2"):
        load_version(tmp_path, "mnist")


def test_data_sets_are_found_flag_first_then_environment(tmp_path):
    env = {"MNIST_DATA_DIR": "/from/env", "FASHION_MNIST_DATA_DIR": "/fashion/env"}
    assert str(find_data_dir("mnist", tmp_path, env)) == str(tmp_path)
    assert str(find_data_dir("mnist", None, env)) == "/from/env"
    assert str(find_data_dir("fashion-mnist", None, env)) == "/fashion/env"
    assert find_data_dir("mnist", None, {}) is None  # no local copy: training downloads
