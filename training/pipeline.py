"""What `mnist-train` does once its flags are read, in named steps: train, export to ONNX,
verify parity, describe the version, publish it (and its INT8 copy), save the artifacts.

Imports TensorFlow (quietly) at import: training/cli.py imports this module only after parsing
its flags, so that --help and a bad flag answer at once.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before TensorFlow, Keras or tf2onnx is first imported

import keras  # noqa: E402

from core import contract  # noqa: E402
from core.idx import Dataset  # noqa: E402
from core.metadata import ModelMetadata  # noqa: E402
from core.repository import write_version  # noqa: E402
from training import plots  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.fit import FitResult, fit  # noqa: E402
from training.int8_gate import (  # noqa: E402
    MAX_ACCURACY_LOSS_POINTS,
    MIN_AGREEMENT,
    Int8ParityError,
)
from training.int8_publish import publish_int8  # noqa: E402
from training.int8_recipe import DEFAULT_RECIPE  # noqa: E402
from training.model import DESCRIPTIONS  # noqa: E402
from training.verify import ParityReport, check_parity  # noqa: E402


@dataclass(frozen=True)
class TrainingRun:
    """What one run produced: the summary is printed from it."""

    config: TrainConfig
    result: FitResult
    parity: ParityReport
    metadata: ModelMetadata
    model_path: Path
    int8_rows: list[tuple[str, str]]
    artifacts: Path


def progress(message: str) -> None:
    print(f"[mnist-train] {message}", file=sys.stderr, flush=True)


def train_and_publish(config: TrainConfig, publish_int8_model: bool = True) -> TrainingRun:
    started = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir)
    progress(
        f"{config.dataset}: {len(data.train_images):,} training / {len(data.test_images):,} test images "
        f"from {data.source}; recipe '{config.recipe_name}'"
    )
    result = fit(config, data)
    trained_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    revision = source_revision()
    onnx_bytes = export(config, result, data, trained_at, revision)
    test_images = contract.to_model_input(data.test_images)
    progress(f"verifying ONNX against Keras on all {len(test_images):,} test images")
    parity = check_parity(
        result.model, onnx_bytes, test_images, data.test_labels, config.parity_tolerance
    )
    metadata = describe(config, data, result, parity, trained_at, revision, started)
    version = write_version(
        config.out, config.model_name, onnx_bytes, metadata, config.max_batch_size
    )
    int8_rows = [("int8 model", "not asked for (--no-int8)")]
    if publish_int8_model:
        int8_rows = publish_int8_rows(config, version, data)
    artifacts = save_artifacts(config, version.version, result, data, test_images)
    return TrainingRun(config, result, parity, metadata, version.model_path, int8_rows, artifacts)


def export(
    config: TrainConfig, result: FitResult, data: Dataset, trained_at: str, revision: str
) -> bytes:
    """The trained model as ONNX, its provenance in the ONNX metadata."""
    onnx_metadata = {
        "class_names": data.class_names,
        "recipe": config.recipe_name,
        "test_accuracy": f"{result.test_accuracy:.4f}",
        "trained_at": trained_at,
        "source_revision": revision,
        "dataset": config.dataset,
    }
    progress(f"exporting to ONNX (opset {config.opset}) with tf2onnx")
    return export_onnx(result.model, onnx_metadata, config.opset).SerializeToString()


def describe(
    config: TrainConfig,
    data: Dataset,
    result: FitResult,
    parity: ParityReport,
    trained_at: str,
    revision: str,
    started: float,
) -> ModelMetadata:
    """The version's metadata.json: provenance, figures, parity, the tensors, the libraries."""
    return ModelMetadata(
        model_name=config.model_name,
        class_names=list(data.class_names),
        dataset=config.dataset,
        recipe=config.recipe_name,
        trained_at=trained_at,
        source_revision=revision,
        test_accuracy=result.test_accuracy,
        onnx_test_accuracy=parity.onnx_accuracy,
        train_accuracy=result.train_accuracy,
        val_accuracy=result.val_accuracy,
        test_loss=result.test_loss,
        hyperparameters=config.hyperparameters(),
        architecture=result.model.name,
        architecture_description=DESCRIPTIONS[config.recipe.architecture],
        parameters=int(result.model.count_params()),
        train_images=result.train_size,
        validation_images=result.val_size,
        history=result.history,
        parity=_parity_fields(parity),
        input=_tensor(contract.INPUT_NAME, contract.INPUT_DATATYPE, contract.input_shape()),
        output=_tensor(
            contract.OUTPUT_NAME,
            contract.OUTPUT_DATATYPE,
            contract.output_shape(len(data.class_names)),
        ),
        opset=config.opset,
        fit_seconds=round(result.wall_seconds, 1),
        versions=_library_versions(),
        wall_seconds=round(time.perf_counter() - started, 1),
    )


def _parity_fields(parity: ParityReport) -> dict:
    return {
        "images": parity.images,
        "max_abs_diff": parity.max_abs_diff,
        "mean_abs_diff": parity.mean_abs_diff,
        "argmax_mismatches": len(parity.argmax_mismatches),
        "tolerance": parity.tolerance,
    }


def _tensor(name: str, datatype: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape}


def _library_versions() -> dict[str, str]:
    return {
        "tensorflow": __import__("tensorflow").__version__,
        "keras": keras.__version__,
        "tf2onnx": __import__("tf2onnx").__version__,
        "onnx": __import__("onnx").__version__,
    }


def save_artifacts(
    config: TrainConfig, version: int, result: FitResult, data: Dataset, test_images
) -> Path:
    """The .keras model and the PNG plots, in <artifacts>/<model>-v<version>/."""
    artifacts = config.artifacts / f"{config.model_name}-v{version}"
    artifacts.mkdir(parents=True, exist_ok=True)
    result.model.save(artifacts / "model.keras")
    predicted = result.model.predict(test_images, batch_size=1000, verbose=0).argmax(axis=1)
    plots.plot_training_curves(result.history, artifacts / "training_curves.png")
    plots.plot_confusion_matrix(
        plots.confusion_matrix(data.test_labels, predicted, len(data.class_names)),
        data.class_names,
        artifacts / "confusion_matrix.png",
    )
    plots.plot_misclassified(
        data.test_images,
        data.test_labels,
        predicted,
        data.class_names,
        artifacts / "misclassified.png",
    )
    return artifacts


def publish_int8_rows(config: TrainConfig, fp32, data) -> list[tuple[str, str]]:
    """Quantize and publish `<name>_int8`; the summary's INT8 rows. A failed gate publishes nothing
    and says why, with the figures it measured."""
    progress(
        f"quantizing to INT8 ({DEFAULT_RECIPE.describe()}) and comparing with the FP32 model "
        "on the test images"
    )
    gate = (
        f"gate: >= {100 * MIN_AGREEMENT:g} % agreement, <= {MAX_ACCURACY_LOSS_POINTS:g} points lost"
    )
    try:
        int8, report, speed = publish_int8(
            config.out,
            fp32,
            data.train_images,
            data.test_images,
            data.test_labels,
            config.max_batch_size,
        )
    except Int8ParityError as err:
        progress(f"INT8 model not published: {err}")
        return [("int8 model", f"not published: {err}"), ("int8 parity", _parity(err.report, gate))]
    return [
        ("int8 model", f"{int8.model_path} ({DEFAULT_RECIPE.describe()})"),
        ("int8 parity", _parity(report, gate)),
        (
            "int8 speed",
            "INT8 / FP32 images per CPU-second, in-process, 1 thread: "
            + ", ".join(f"batch {s.batch} {s.speedup:.2f}x" for s in speed)
            + " (median of paired rounds)",
        ),
    ]


def _parity(report, gate: str) -> str:
    return (
        f"agrees with FP32 on {report.agreeing:,} of {report.images:,} test images "
        f"({100 * report.agreement:.2f} %); test accuracy {report.int8_accuracy:.4f} "
        f"(FP32 {report.fp32_accuracy:.4f}, {-report.accuracy_loss_points:+.2f} points); "
        f"{gate}"
    )


def source_revision() -> str:
    """The git commit the code came from (with -dirty for uncommitted changes), else 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
