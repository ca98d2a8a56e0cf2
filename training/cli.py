"""`mnist-train`: fit the article's CNN, export it to ONNX, prove parity, publish a model version.

The flags and the printed summary; the steps themselves are in training/pipeline.py."""

from __future__ import annotations

import argparse
import sys
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
    _add_data_flags(parser)
    _add_hyper_parameter_flags(parser)
    _add_output_flags(parser)
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Which data set, from where, how much of it."""
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


def _add_hyper_parameter_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe's hyper-parameters, each overridable, and the seed."""
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


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Where the model version and the artifacts go, and what is published."""
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


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 3 + max(len(value) for _, value in rows))
    return "\n".join([line, *(f"{name:<{width}} | {value}" for name, value in rows), line])


def run(config: TrainConfig, publish_int8_model: bool = True) -> int:
    # Imported here, after argument parsing: it loads TensorFlow, and --help and bad flags answer
    # at once.
    from training.pipeline import train_and_publish

    print(summary_table(summary_rows(train_and_publish(config, publish_int8_model))))
    return 0


def summary_rows(run) -> list[tuple[str, str]]:
    """The summary printed at the end of a run (a training.pipeline.TrainingRun)."""
    config, result, parity, metadata = run.config, run.result, run.parity, run.metadata
    percent = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    return [
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
        ("model", str(run.model_path)),
        *run.int8_rows,
        ("artifacts", str(run.artifacts)),
    ]


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
