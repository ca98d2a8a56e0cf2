"""`mnist-train`: fit the article's CNN, export it to ONNX, prove parity, publish a model version."""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

from training.config import RECIPES, TrainConfig, make_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-train",
        description="Train the article's MNIST CNN, export it to ONNX, verify ONNX against Keras "
        "on every test image, and add a version to a Triton-style model repository.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="article",
        help="article: the article's SGD recipe (0.9704); best: the strongest CPU recipe",
    )
    parser.add_argument(
        "--summary", action="store_true", help="print the network's Keras summary and exit"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    data.add_argument(
        "--data-dir",
        help="folder of the four IDX files (default: $MNIST_DATA_DIR or "
        "$FASHION_MNIST_DATA_DIR; for Fashion-MNIST then Debian's "
        "/usr/share/datasets/fashion-mnist; else Keras' download)",
    )
    data.add_argument(
        "--limit", type=int, help="train on the first N training images only (quick looks, tests)"
    )
    hyper = parser.add_argument_group("hyper-parameters (default: the recipe's)")
    hyper.add_argument("--epochs", type=int)
    hyper.add_argument("--batch-size", type=int)
    hyper.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"])
    hyper.add_argument("--learning-rate", type=float)
    hyper.add_argument(
        "--validation-split",
        type=float,
        default=0.1,
        help="fraction of the training set held out and reported each epoch",
    )
    hyper.add_argument(
        "--seed",
        type=int,
        default=42,
        help="fixes initialisation, shuffling and augmentation (TensorFlow op determinism on)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, default=Path("model_repository"), help="model repository folder"
    )
    out.add_argument("--model-name", default="mnist")
    out.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="folder for the .keras model and the PNG plots, in <artifacts>/<model>-v<version>/",
    )
    out.add_argument(
        "--max-batch-size", type=int, default=64, help="max_batch_size written to config.pbtxt"
    )
    out.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    out.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="skip the INT8 model (by default a statically quantized copy is published as "
        "<model-name>_int8 when it agrees with the FP32 model on 99.5%% of the test images)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of images")
    if args.opset < 17:
        raise ValueError("--opset must be 17 or newer")
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
    }
    return make_config(
        args.recipe,
        overrides,
        dataset=args.dataset,
        data_dir=args.data_dir,
        validation_split=args.validation_split,
        seed=args.seed,
        limit=args.limit,
        out=args.out,
        model_name=args.model_name,
        artifacts=args.artifacts,
        max_batch_size=args.max_batch_size,
        opset=args.opset,
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


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 3 + max(len(value) for _, value in rows))
    return "\n".join([line, *(f"{name:<{width}} | {value}" for name, value in rows), line])


def _progress(message: str) -> None:
    print(f"[mnist-train] {message}", file=sys.stderr, flush=True)


def _publish_int8(config: TrainConfig, fp32, data) -> list[tuple[str, str]]:
    """Quantize and publish `<name>_int8`; the summary's INT8 rows. A failed gate publishes nothing
    and says why, with the figures it measured."""
    from training.quantize import (
        DEFAULT_RECIPE,
        MAX_ACCURACY_LOSS_POINTS,
        MIN_AGREEMENT,
        Int8ParityError,
        publish_int8,
    )

    _progress(
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
        _progress(f"INT8 model not published: {err}")
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


def run(config: TrainConfig, publish_int8_model: bool = True) -> int:
    # Heavy imports after argument parsing, so --help and bad flags answer at once.
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from core import contract
    from core.metadata import ModelMetadata
    from core.repository import write_version
    from training import plots
    from training.data import load_dataset
    from training.export import export_onnx
    from training.fit import fit
    from training.model import DESCRIPTIONS
    from training.verify import check_parity

    started = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir)
    _progress(
        f"{config.dataset}: {len(data.train_images):,} training / {len(data.test_images):,} test images "
        f"from {data.source}; recipe '{config.recipe_name}'"
    )
    result = fit(config, data)

    trained_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    revision = source_revision()
    onnx_metadata = {
        "class_names": data.class_names,
        "recipe": config.recipe_name,
        "test_accuracy": f"{result.test_accuracy:.4f}",
        "trained_at": trained_at,
        "source_revision": revision,
        "dataset": config.dataset,
    }
    _progress(f"exporting to ONNX (opset {config.opset}) with tf2onnx")
    onnx_bytes = export_onnx(result.model, onnx_metadata, config.opset).SerializeToString()

    test_images = contract.to_model_input(data.test_images)
    _progress(f"verifying ONNX against Keras on all {len(test_images):,} test images")
    parity = check_parity(
        result.model, onnx_bytes, test_images, data.test_labels, config.parity_tolerance
    )

    metadata = ModelMetadata(
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
        parity={
            "images": parity.images,
            "max_abs_diff": parity.max_abs_diff,
            "mean_abs_diff": parity.mean_abs_diff,
            "argmax_mismatches": len(parity.argmax_mismatches),
            "tolerance": parity.tolerance,
        },
        input={
            "name": contract.INPUT_NAME,
            "datatype": contract.INPUT_DATATYPE,
            "shape": contract.input_shape(),
        },
        output={
            "name": contract.OUTPUT_NAME,
            "datatype": contract.OUTPUT_DATATYPE,
            "shape": contract.output_shape(len(data.class_names)),
        },
        opset=config.opset,
        fit_seconds=round(result.wall_seconds, 1),
        versions={
            "tensorflow": __import__("tensorflow").__version__,
            "keras": keras.__version__,
            "tf2onnx": __import__("tf2onnx").__version__,
            "onnx": __import__("onnx").__version__,
        },
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    version = write_version(
        config.out, config.model_name, onnx_bytes, metadata, config.max_batch_size
    )
    int8_rows = [("int8 model", "not asked for (--no-int8)")]
    if publish_int8_model:
        int8_rows = _publish_int8(config, version, data)

    artifacts = config.artifacts / f"{config.model_name}-v{version.version}"
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

    percent = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    print(
        summary_table(
            [
                (
                    "recipe",
                    f"{config.recipe_name} ({result.model.name}, {result.model.count_params():,} parameters)",
                ),
                ("epochs", str(config.recipe.epochs)),
                (
                    "wall time",
                    f"{result.wall_seconds:.1f} s fitting, {metadata.wall_seconds:.1f} s in all",
                ),
                ("train accuracy", percent(result.train_accuracy)),
                ("val accuracy", percent(result.val_accuracy)),
                (
                    "test accuracy",
                    f"{percent(result.test_accuracy)} (Keras), {percent(parity.onnx_accuracy)} (ONNX)",
                ),
                (
                    "parity",
                    f"max |Δp| {parity.max_abs_diff:.1e} over {parity.images:,} images, "
                    f"{len(parity.argmax_mismatches)} argmax differences",
                ),
                ("model", str(version.model_path)),
                *int8_rows,
                ("artifacts", str(artifacts)),
            ]
        )
    )
    return 0


def print_summary(config: TrainConfig) -> int:
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from training.model import ARCHITECTURES

    ARCHITECTURES[config.recipe.architecture]().summary()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.idx import DatasetError
    from core.repository import RepositoryError

    try:
        config = config_from_args(args)
        if args.summary:
            return print_summary(config)
        return run(config, publish_int8_model=args.int8)
    except KeyboardInterrupt:
        print("mnist-train: interrupted", file=sys.stderr)
        return 130
    except (DatasetError, RepositoryError, ValueError, OSError) as err:
        print(f"mnist-train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # ParityError and anything unforeseen: one line, not a traceback
        print(f"mnist-train: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
