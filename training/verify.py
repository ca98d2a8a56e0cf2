"""Proof that the exported ONNX model computes what the Keras model computes."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import onnxruntime as ort

from core.contract import INPUT_NAME, OUTPUT_NAME


class ParityError(Exception):
    """ONNX and Keras disagree beyond the tolerance; the message says on which images."""


@dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    argmax_mismatches: list[int] = field(default_factory=list)  # indices of test images
    keras_accuracy: float = 0.0
    onnx_accuracy: float = 0.0
    tolerance: float = 1e-4

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.argmax_mismatches

    def describe_failure(self, diffs_over: list[int]) -> str:
        shown = ", ".join(map(str, diffs_over[:10])) + (" …" if len(diffs_over) > 10 else "")
        return (
            f"ONNX differs from Keras: max |Δp| {self.max_abs_diff:.2e} > {self.tolerance:.0e} on "
            f"{len(diffs_over)} images ({shown}); argmax differs on {len(self.argmax_mismatches)} images"
        )


def onnx_predict(onnx_bytes: bytes, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def check_parity(
    model: keras.Model,
    onnx_bytes: bytes,
    images: np.ndarray,
    labels: np.ndarray,
    tolerance: float = 1e-4,
) -> ParityReport:
    """Run both over every image; raise ParityError naming the images that differ."""
    keras_probs = model.predict(images, batch_size=1000, verbose=0)
    onnx_probs = onnx_predict(onnx_bytes, images)
    per_image = np.abs(keras_probs - onnx_probs).max(axis=1)
    keras_labels, onnx_labels = keras_probs.argmax(axis=1), onnx_probs.argmax(axis=1)
    report = ParityReport(
        images=len(images),
        max_abs_diff=float(per_image.max()),
        mean_abs_diff=float(np.abs(keras_probs - onnx_probs).mean()),
        argmax_mismatches=np.flatnonzero(keras_labels != onnx_labels).tolist(),
        keras_accuracy=float((keras_labels == labels).mean()),
        onnx_accuracy=float((onnx_labels == labels).mean()),
        tolerance=tolerance,
    )
    if not report.passed:
        raise ParityError(report.describe_failure(np.flatnonzero(per_image > tolerance).tolist()))
    return report
