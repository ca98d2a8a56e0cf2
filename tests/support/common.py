"""The checkout's root, the real MNIST files and the quick training the serving tests need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A few seconds of training that still reads digits well (~95 %): what the serving tests need.
QUICK_TRAIN_ARGS = (
    "--limit",
    "6000",
    "--epochs",
    "2",
    "--optimizer",
    "adam",
    "--learning-rate",
    "0.002",
)


def mnist_dir() -> Path:
    configured = os.environ.get("MNIST_DATA_DIR")
    path = Path(configured) if configured else ROOT.parent / "shared" / "datasets" / "mnist"
    if (
        not (path / "t10k-images-idx3-ubyte.gz").exists()
        and not (path / "t10k-images-idx3-ubyte").exists()
    ):
        pytest.fail(
            f"MNIST files not found in {path}: set MNIST_DATA_DIR to the folder of the IDX files"
        )
    return path


def run_train(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
        env={**os.environ, "MNIST_DATA_DIR": str(mnist_dir())},
    )


def predict_args(target: str, data_dir: Path, digits: int) -> tuple[str, ...]:
    """`mnist-predict`'s arguments for the first `digits` MNIST test images against `target`."""
    return ("--target", target, "--mnist-test", str(digits), "--data-dir", str(data_dir))


def run_predict(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.predict_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
