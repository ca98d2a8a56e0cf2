"""metadata.json: what training knows about a published model version, as a typed, versioned record.

Training writes it beside model.onnx; serving reads it (class names, checksum, accuracy) and
shows its scalar fields in DescribeModel. `schema_version` says which layout a file has: the
files written before the field existed are version 1, the layout below. A reader refuses a
version it does not know, naming the file, rather than guess at its fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.contract import CLASS_NAMES

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
# What a server cannot do without; write_version always fills these.
REQUIRED_FIELDS = ("model_name", "version", "model_sha256", "class_names")


class MetadataError(ValueError):
    """A metadata.json this code cannot read; the message names the file and what to do."""


@dataclass(frozen=True)
class ModelMetadata:
    """One version's metadata.json. Fields that a run did not measure are None."""

    model_name: str = ""
    version: int = 0  # filled in by core.repository.write_version
    model_sha256: str = ""  # sha256 of model.onnx, filled in by write_version
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES["mnist"]))
    dataset: str = "mnist"
    recipe: str = ""
    trained_at: str = ""  # ISO 8601, UTC
    source_revision: str = ""  # git commit of the training code
    test_accuracy: float | None = None  # Keras, on the full test set
    onnx_test_accuracy: float | None = None  # the exported model, on the same images
    train_accuracy: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    architecture: str = ""
    architecture_description: str = ""
    parameters: int | None = None
    train_images: int | None = None
    validation_images: int | None = None
    opset: int | None = None
    fit_seconds: float | None = None
    wall_seconds: float | None = None
    input: dict[str, Any] = field(default_factory=dict)  # {"name", "datatype", "shape"}
    output: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch curves
    parity: dict[str, Any] = field(default_factory=dict)  # ONNX vs Keras on the test set
    versions: dict[str, str] = field(default_factory=dict)  # library versions used
    # Keys this schema does not name (a newer trainer's additions), kept so a file round-trips.
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the fields, with `extra`'s keys at the top level as they were read."""
        record = asdict(self)
        extra = record.pop("extra")
        return {**extra, **record}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def scalars(self) -> dict[str, str]:
        """The top-level numbers and strings, as text (DescribeModel's metadata map)."""
        return {
            key: str(value)
            for key, value in self.to_dict().items()
            if isinstance(value, (str, int, float, bool)) and value is not None
        }

    @classmethod
    def from_dict(cls, record: Any, source: str = "metadata.json") -> ModelMetadata:
        if not isinstance(record, dict):
            raise MetadataError(
                f"{source}: expected a JSON object, found {type(record).__name__}; retrain or fix it"
            )
        record = dict(record)
        # Files written before the field existed have the version 1 layout.
        schema_version = record.pop("schema_version", 1)
        if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise MetadataError(
                f"{source}: schema_version {schema_version!r} is not one this code reads "
                f"({', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade mnist-cnn-serving or retrain the model"
            )
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise MetadataError(
                f"{source}: missing field(s) {', '.join(missing)}; "
                "the version was not published by mnist-train: retrain it"
            )
        known = {f.name for f in fields(cls)} - {"extra", "schema_version"}
        values = {key: value for key, value in record.items() if key in known}
        extra = {key: value for key, value in record.items() if key not in known}
        if not isinstance(values["version"], int) or not isinstance(values["model_sha256"], str):
            raise MetadataError(
                f"{source}: 'version' must be an integer and 'model_sha256' a string"
            )
        if not isinstance(values["class_names"], list) or not all(
            isinstance(n, str) for n in values["class_names"]
        ):
            raise MetadataError(f"{source}: 'class_names' must be a list of strings")
        return cls(**values, extra=extra, schema_version=schema_version)

    @classmethod
    def from_json(cls, text: str, source: str = "metadata.json") -> ModelMetadata:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise MetadataError(f"{source} is not valid JSON ({err}); retrain or fix it") from err
        return cls.from_dict(record, source)

    @classmethod
    def read(cls, path: Path) -> ModelMetadata:
        return cls.from_json(Path(path).read_text(), str(path))
