"""Publishing the INT8 copy: quantize the published FP32 version, gate it, and write it as a
model of its own (`<name>_int8`) whose metadata records the recipe, the parity and the speed."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.int8_calibration import pick_calibration_images
from training.int8_gate import (
    MAX_ACCURACY_LOSS_POINTS,
    MIN_AGREEMENT,
    ParityReport,
    SpeedReport,
    check_parity,
    compare_int8,
    compare_speed,
)
from training.int8_recipe import DEFAULT_RECIPE, Int8Recipe
from training.quantize import quantize_int8

if TYPE_CHECKING:
    from core.metadata import ModelMetadata
    from core.repository import ModelVersion

INT8_SUFFIX = "_int8"  # the INT8 copy of model `mnist` is published as model `mnist_int8`


def publish_int8(
    repository: Path,
    fp32: ModelVersion,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    max_batch_size: int,
    recipe: Int8Recipe = DEFAULT_RECIPE,
) -> tuple[ModelVersion, ParityReport, list[SpeedReport]]:
    """Quantize the published FP32 version; publish the INT8 copy as `<name>_int8` if it passes.

    The INT8 model is a model of its own in the repository (its own config.pbtxt and versions), so a
    server serves one or the other by --model-name. Raises Int8ParityError, publishing nothing, when
    it disagrees with the FP32 model on more than 0.5 % of the test images or loses more than 0.2
    points of accuracy. Its speed beside FP32's is measured and recorded in its metadata.
    """
    from core.repository import write_version

    calibration = pick_calibration_images(train_images, recipe.calibration_images)
    with tempfile.TemporaryDirectory() as scratch:
        int8_path = quantize_int8(fp32.model_path, calibration, Path(scratch) / "int8.onnx", recipe)
        report = check_parity(compare_int8(fp32.model_path, int8_path, test_images, test_labels))
        speed = compare_speed(fp32.model_path, int8_path, test_images)
        onnx_bytes = int8_path.read_bytes()
    metadata = int8_metadata(fp32, report, speed, recipe, len(calibration))
    version = write_version(
        repository, f"{fp32.name}{INT8_SUFFIX}", onnx_bytes, metadata, max_batch_size
    )
    return version, report, speed


def int8_metadata(
    fp32: ModelVersion,
    report: ParityReport,
    speed: list[SpeedReport],
    recipe: Int8Recipe,
    calibration_images: int,
) -> ModelMetadata:
    """The FP32 version's metadata, restated for its INT8 copy: accuracy, parity, recipe, speed."""
    return dataclasses.replace(
        fp32.metadata,
        test_accuracy=report.int8_accuracy,
        onnx_test_accuracy=report.int8_accuracy,
        parity={
            "images": report.images,
            "argmax_agreement": report.agreement,
            "agreeing": report.agreeing,
            "minimum_agreement": MIN_AGREEMENT,
            "max_accuracy_loss_points": MAX_ACCURACY_LOSS_POINTS,
            "compared_with": f"{fp32.name} v{fp32.version}",
        },
        extra={
            **fp32.metadata.extra,
            "precision": "int8",
            "quantization": recipe.as_metadata(calibration_images),
            "fp32_model": {
                "name": fp32.name,
                "version": fp32.version,
                "sha256": fp32.metadata.model_sha256,
                "test_accuracy": report.fp32_accuracy,
            },
            "accuracy_loss_points": round(report.accuracy_loss_points, 4),
            # Measured where it was trained, on one onnxruntime thread: a ratio, not a promise.
            "speed_vs_fp32": {
                f"batch_{s.batch}": {
                    "fp32_images_per_cpu_s_median": round(s.fp32_images_per_s),
                    "int8_images_per_cpu_s_median": round(s.int8_images_per_s),
                    "speedup": round(s.speedup, 2),
                }
                for s in speed
            },
        },
    )
