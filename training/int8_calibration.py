"""The calibration data: which training images set the activation ranges, and how
onnxruntime's calibrator reads them (in batches, as the server feeds pixels)."""

from __future__ import annotations

import numpy as np

from core.contract import to_model_input  # the pixels as the server feeds them
from training.int8_recipe import DEFAULT_RECIPE

CALIBRATION_BATCH = 100


def pick_calibration_images(
    train_images: np.ndarray, count: int = DEFAULT_RECIPE.calibration_images, seed: int = 0
) -> np.ndarray:
    """A fixed random sample of the training images: reproducible scales, every digit in it."""
    rng = np.random.default_rng(seed)
    return train_images[
        rng.choice(len(train_images), size=min(count, len(train_images)), replace=False)
    ]


def calibration_reader(calibration_images: np.ndarray, input_name: str):
    """An onnxruntime CalibrationDataReader over the images, CALIBRATION_BATCH at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                np.array_split(
                    to_model_input(calibration_images),
                    max(1, len(calibration_images) // CALIBRATION_BATCH),
                )
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return Batches()
