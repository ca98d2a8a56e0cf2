"""Every INT8 option on the same FP32 models: `python -m training.int8_study MODEL.onnx ...`.

Training takes minutes per seed, quantization seconds, so the study trains once per seed
(`mnist-train --seed N --no-int8`) and then quantizes each saved FP32 model every way listed in
VARIANTS, printing one Markdown row per (model, variant): argmax agreement with FP32 on the
10,000 test images, both accuracies, whether the gate passes and, with --speed, INT8's in-process
speed over FP32's at batch 1 and 64 (one onnxruntime thread, rounds interleaved, best kept).
docs/int8.md holds the figures this printed and the choice they led to.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from training.int8_calibration import pick_calibration_images
from training.int8_gate import MAX_ACCURACY_LOSS_POINTS, MIN_AGREEMENT, compare_int8, compare_speed
from training.int8_recipe import DEFAULT_RECIPE, Int8Recipe
from training.quantize import quantize_int8

_ALL_INT8 = dataclasses.replace(DEFAULT_RECIPE, fp32_last_layer=False)

# The recipe before the study first (every layer INT8, MinMax on 1,000 images), then one change
# at a time from it, then the same changes on top of the chosen default (last layer FP32).
# The table names each variant and describes it (Int8Recipe.describe); "*" marks the default.
VARIANTS: dict[str, Int8Recipe] = {
    "before": _ALL_INT8,
    "calib100": dataclasses.replace(_ALL_INT8, calibration_images=100),
    "calib5k": dataclasses.replace(_ALL_INT8, calibration_images=5000),
    "entropy": dataclasses.replace(_ALL_INT8, calibration="Entropy"),
    "percentile": dataclasses.replace(_ALL_INT8, calibration="Percentile"),
    "per-tensor": dataclasses.replace(_ALL_INT8, per_channel=False),
    "qoperator": dataclasses.replace(_ALL_INT8, quant_format="QOperator"),
    "s8-symmetric": dataclasses.replace(_ALL_INT8, activations="int8", symmetric_activations=True),
    "reduce-range": dataclasses.replace(_ALL_INT8, reduce_range=True),
    "first-fp32": dataclasses.replace(_ALL_INT8, fp32_first_layer=True),
    "last-fp32": DEFAULT_RECIPE,
    "first+last-fp32": dataclasses.replace(DEFAULT_RECIPE, fp32_first_layer=True),
    "last-fp32+entropy": dataclasses.replace(DEFAULT_RECIPE, calibration="Entropy"),
    "last-fp32+percentile": dataclasses.replace(DEFAULT_RECIPE, calibration="Percentile"),
    "last-fp32+calib5k": dataclasses.replace(DEFAULT_RECIPE, calibration_images=5000),
    "last-fp32+reduce-range": dataclasses.replace(DEFAULT_RECIPE, reduce_range=True),
    "last-fp32+qoperator": dataclasses.replace(DEFAULT_RECIPE, quant_format="QOperator"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.int8_study", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "models", nargs="+", type=Path, help="FP32 ONNX files (mnist-train --no-int8 output)"
    )
    parser.add_argument(
        "--variants", help="comma-separated names (default: all): " + ", ".join(VARIANTS)
    )
    parser.add_argument(
        "--speed", action="store_true", help="also measure INT8 vs FP32 images/s (slower)"
    )
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DATA_DIR)")
    return parser


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


HEADER = [
    "model",
    "variant",
    "recipe",
    "agreement",
    "differ",
    "FP32 acc",
    "INT8 acc",
    "Δ points",
    "gate",
]
SPEED_HEADER = ["×FP32 b1", "×FP32 b64"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(VARIANTS) if not args.variants else [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    missing = [str(m) for m in args.models if not m.is_file()]
    if unknown or missing:
        print(
            "int8_study: error: "
            + (f"unknown variant {unknown[0]!r}" if unknown else f"no file {missing[0]}"),
            file=sys.stderr,
        )
        return 2
    data = _load_mnist(args.data_dir)
    if data is None:
        return 2
    header = HEADER + (SPEED_HEADER if args.speed else [])
    print(row(header))
    print(row(["---"] * len(header)), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for name in names:
                print(_study_row(model, name, data, Path(scratch), args.speed), flush=True)
    return 0


def _load_mnist(data_dir: str | None):
    """The MNIST dataset, or None after printing why it could not be read."""
    from core.idx import DatasetError, find_data_dir, load_idx_dir

    try:
        folder = find_data_dir("mnist", data_dir)
        if folder is None:
            raise DatasetError("no MNIST folder: pass --data-dir or set MNIST_DATA_DIR")
        return load_idx_dir(folder)
    except DatasetError as err:
        print(f"int8_study: error: {err}", file=sys.stderr)
        return None


def _study_row(model: Path, name: str, data, scratch: Path, speed: bool) -> str:
    """Quantize `model` as variant `name`, compare it with FP32: the table row, and its time."""
    label = model.parent.parent.parent.parent.name if model.name == "model.onnx" else model.stem
    recipe = VARIANTS[name]
    int8_path = scratch / "int8.onnx"
    started = time.perf_counter()
    quantize_int8(
        model,
        pick_calibration_images(data.train_images, recipe.calibration_images),
        int8_path,
        recipe,
    )
    seconds = time.perf_counter() - started
    report = compare_int8(model, int8_path, data.test_images, data.test_labels)
    passes = (
        report.agreement >= MIN_AGREEMENT
        and report.accuracy_loss_points <= MAX_ACCURACY_LOSS_POINTS + 1e-9
    )
    cells = [
        label,
        name + (" *" if recipe == DEFAULT_RECIPE else ""),
        recipe.describe(),
        f"{100 * report.agreement:.2f} %",
        str(report.images - report.agreeing),
        f"{100 * report.fp32_accuracy:.2f}",
        f"{100 * report.int8_accuracy:.2f}",
        f"{-report.accuracy_loss_points:+.2f}",
        "pass" if passes else "REFUSED",
    ]
    if speed:
        cells += [f"{s.speedup:.2f}" for s in compare_speed(model, int8_path, data.test_images)]
    return row(cells) + f"  <!-- quantized in {seconds:.1f} s -->"


if __name__ == "__main__":
    sys.exit(main())
