"""The gate on publishing the INT8 model: its answers beside the FP32 model's on the test
images (argmax agreement, each model's accuracy), the check that refuses it, and the speed of
both models side by side (recorded in the INT8 model's metadata)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import to_model_input  # the pixels as the server feeds them

MIN_AGREEMENT = 0.995
MAX_ACCURACY_LOSS_POINTS = 0.2  # the bound: INT8 loses at most 0.2 points of test accuracy
SPEED_BATCHES = (1, 64)


class Int8ParityError(RuntimeError):
    """The INT8 model disagrees with the FP32 model on too many test images to be published."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ParityReport:
    images: int
    agreeing: int
    fp32_accuracy: float
    int8_accuracy: float

    @property
    def agreement(self) -> float:
        return self.agreeing / self.images

    @property
    def accuracy_loss_points(self) -> float:
        """FP32 minus INT8 test accuracy, in percentage points (negative: INT8 did better)."""
        return 100 * (self.fp32_accuracy - self.int8_accuracy)


@dataclass(frozen=True)
class SpeedReport:
    """In-process onnxruntime images per CPU-second of both models at one batch size (1 thread)."""

    batch: int
    fp32_images_per_s: float  # medians over the rounds
    int8_images_per_s: float
    speedup: (
        float  # the median of the rounds' INT8/FP32 ratios (each round measures both, back to back)
    )


def predict_labels(model_path: Path, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """argmax of the model's output on uint8 [N, 28, 28] images, in batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [
            session.run(None, {name: to_model_input(images[i : i + batch])})[0].argmax(axis=1)
            for i in range(0, len(images), batch)
        ]
    )


def compare_int8(
    fp32_path: Path, int8_path: Path, test_images: np.ndarray, test_labels: np.ndarray
) -> ParityReport:
    """Both models on the test images: how many answers agree, and each model's accuracy."""
    fp32, int8 = predict_labels(fp32_path, test_images), predict_labels(int8_path, test_images)
    return ParityReport(
        images=len(test_images),
        agreeing=int((fp32 == int8).sum()),
        fp32_accuracy=float((fp32 == test_labels).mean()),
        int8_accuracy=float((int8 == test_labels).mean()),
    )


def check_parity(
    report: ParityReport,
    minimum: float = MIN_AGREEMENT,
    max_loss_points: float = MAX_ACCURACY_LOSS_POINTS,
) -> ParityReport:
    """Raise Int8ParityError unless the INT8 model agrees with the FP32 model on `minimum` of the
    images and loses at most `max_loss_points` points of test accuracy."""
    if report.agreement < minimum:
        needed = int(np.ceil(minimum * report.images))
        raise Int8ParityError(
            f"the INT8 model agrees with the FP32 model on {report.agreeing} of {report.images} "
            f"test images ({100 * report.agreement:.2f} %); publishing it needs at least {needed} "
            f"({100 * minimum:g} %)",
            report,
        )
    if report.accuracy_loss_points > max_loss_points + 1e-9:
        raise Int8ParityError(
            f"the INT8 model's test accuracy is {100 * report.int8_accuracy:.2f} %, "
            f"{report.accuracy_loss_points:.2f} points below the FP32 model's "
            f"({100 * report.fp32_accuracy:.2f} %); publishing it allows at most "
            f"{max_loss_points:g}",
            report,
        )
    return report


def _images_per_cpu_second(session, name: str, batch: np.ndarray, seconds: float) -> float:
    # CPU time of this thread, not wall time: one intra-op thread runs on the caller's thread, and
    # on a shared machine wall time mostly measures the neighbours.
    runs, started = 0, time.thread_time()
    while (spent := time.thread_time() - started) < seconds:
        session.run(None, {name: batch})
        runs += 1
    return runs * len(batch) / spent


def compare_speed(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    batches: tuple[int, ...] = SPEED_BATCHES,
    rounds: int = 9,
    seconds: float = 0.05,
) -> list[SpeedReport]:
    """Both models in this process at each batch size, on one intra-op thread each (what a server
    worker runs small batches on): images per CPU-second, measured back to back in each round.

    The median of the rounds' ratios, not a ratio of bests: on the study's 2 shared cores (load
    average 16-20) FP32 against itself read 0.87-1.14 as a ratio of bests, 0.99-1.07 this way."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for path in (fp32_path, int8_path)
    ]
    name = sessions[0].get_inputs()[0].name
    reports = []
    for size in batches:
        batch = to_model_input(images[:size])
        for session in sessions:
            session.run(None, {name: batch})  # warm-up: first runs allocate
        speeds = np.array(
            [
                [_images_per_cpu_second(session, name, batch, seconds) for session in sessions]
                for _ in range(rounds)
            ]
        )
        fp32, int8 = np.median(speeds, axis=0)
        reports.append(
            SpeedReport(
                batch=size,
                fp32_images_per_s=float(fp32),
                int8_images_per_s=float(int8),
                speedup=float(np.median(speeds[:, 1] / speeds[:, 0])),
            )
        )
    return reports
