"""Static INT8 quantization of the exported FP32 model, and the parity gate on publishing it.

onnxruntime's quantization tools write a QDQ model: QuantizeLinear/DequantizeLinear pairs around
the convolutions, which onnxruntime fuses into integer kernels (VNNI on CPUs that have it).
Activation ranges come from calibration on training images (min/max), weights are quantized per
output channel (each filter gets its own scale: the filters' ranges differ a lot, and per-channel
costs nothing at run time). The last layer (the dense layer and its logits) and the softmax stay
FP32: 8-bit logits flipped close calls (Int8Recipe), and the probabilities keep their resolution
instead of being rounded to 1/256.

The INT8 model is published only if its answers agree with the FP32 model's on at least 99.5 %
of the 10,000 test images (argmax agreement) and it loses at most 0.2 points of test accuracy;
`check_parity` raises otherwise. docs/int8.md has the study behind the recipe and its figures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from core.contract import to_model_input  # the pixels as the server feeds them

if TYPE_CHECKING:
    from core.repository import ModelVersion

MIN_AGREEMENT = 0.995
MAX_ACCURACY_LOSS_POINTS = 0.2  # the bound: INT8 loses at most 0.2 points of test accuracy
INT8_SUFFIX = "_int8"  # the INT8 copy of model `mnist` is published as model `mnist_int8`
CALIBRATION_BATCH = 100
# Quantized: where the arithmetic is. MaxPool, Reshape, Flatten pass quantized tensors through.
OPS_TO_QUANTIZE = [
    "Conv",
    "MatMul",
    "Gemm",
    "MaxPool",
    "Relu",
    "Add",
    "Reshape",
    "Flatten",
    "Transpose",
]
SPEED_BATCHES = (1, 64)


class Int8ParityError(RuntimeError):
    """The INT8 model disagrees with the FP32 model on too many test images to be published."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Int8Recipe:
    """How the INT8 copy is made. The defaults are the study's choice (docs/int8.md,
    `python -m training.int8_study`): on the article recipe's models the quantized last layer
    caused most of the disagreement (its 10 logits rounded to 8 bits flip close calls: 8-18
    test images per seed, 2-5 with it in FP32), and it holds 0.3 % of the multiply-adds (10k of
    3.7M), so keeping it FP32 costs next to nothing. No calibration method or size, weight or
    activation scheme moved the agreement by more than a few images."""

    calibration: str = "MinMax"  # MinMax, Entropy or Percentile (onnxruntime's calibrators)
    calibration_images: int = 1000  # training images; min/max ranges are stable from a few hundred
    per_channel: bool = True  # each filter its own scale: the filters' ranges differ a lot
    quant_format: str = "QDQ"  # or QOperator (QLinearConv...); onnxruntime's CPU kernels prefer QDQ
    activations: str = "uint8"  # U8 activations x S8 weights: the VNNI instruction's form; or int8
    symmetric_activations: bool = False
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI whose u8 x s8 sums saturate
    fp32_first_layer: bool = False  # the first convolution kept in FP32
    fp32_last_layer: bool = True  # the dense layer (logits) kept in FP32

    def __post_init__(self) -> None:
        if self.calibration not in ("MinMax", "Entropy", "Percentile"):
            raise ValueError(
                f"unknown calibration '{self.calibration}'; use MinMax, Entropy or Percentile"
            )
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(f"unknown format '{self.quant_format}'; use QDQ or QOperator")
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"unknown activation type '{self.activations}'; use uint8 or int8")
        if self.calibration_images < 1:
            raise ValueError("INT8 quantization needs at least one calibration image")

    def describe(self) -> str:
        kept = [
            name
            for name, kept in (("first", self.fp32_first_layer), ("last", self.fp32_last_layer))
            if kept
        ]
        return ", ".join(
            [
                f"static {self.quant_format}",
                f"{self.calibration} calibration on {self.calibration_images:,} images",
                "per-channel weights" if self.per_channel else "per-tensor weights",
                ("symmetric " if self.symmetric_activations else "")
                + f"{self.activations} activations",
                *(["7-bit weights (reduce_range)"] if self.reduce_range else []),
                (
                    f"{' and '.join(kept)} layer{'s' if len(kept) > 1 else ''} FP32"
                    if kept
                    else "every layer INT8"
                ),
            ]
        )

    def as_metadata(self, calibration_images: int) -> dict[str, object]:
        return {
            "method": "static",
            "format": self.quant_format,
            "activations": self.activations,
            "weights": "int8",
            "per_channel": self.per_channel,
            "calibration": self.calibration,
            "calibration_images": calibration_images,
            "symmetric_activations": self.symmetric_activations,
            "reduce_range": self.reduce_range,
            "fp32_first_layer": self.fp32_first_layer,
            "fp32_last_layer": self.fp32_last_layer,
        }


DEFAULT_RECIPE = Int8Recipe()


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


def pick_calibration_images(
    train_images: np.ndarray, count: int = DEFAULT_RECIPE.calibration_images, seed: int = 0
) -> np.ndarray:
    """A fixed random sample of the training images: reproducible scales, every digit in it."""
    rng = np.random.default_rng(seed)
    return train_images[
        rng.choice(len(train_images), size=min(count, len(train_images)), replace=False)
    ]


def layer_nodes(graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """Names of the nodes of the first layer (its Conv) and of the last (the final MatMul/Gemm
    and its bias Add), as `graph` spells them (names change in onnxruntime's pre-processing)."""
    nodes = list(graph.node)
    first = [n.name for n in nodes if n.op_type in ("Conv", "MatMul", "Gemm")][:1]
    dense = [n for n in nodes if n.op_type in ("MatMul", "Gemm", "Conv")][-1:]
    last = [n.name for n in dense]
    if dense:
        outputs = set(dense[0].output)
        last += [n.name for n in nodes if n.op_type == "Add" and outputs & set(n.input)]
    return first, last


def quantize_int8(
    fp32_path: Path,
    calibration_images: np.ndarray,
    int8_path: Path,
    recipe: Int8Recipe = DEFAULT_RECIPE,
) -> Path:
    """Write a statically quantized (S8 weights) copy of `fp32_path`, made as `recipe` says."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise ValueError("INT8 quantization needs at least one calibration image")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

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

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        # Shape inference and graph folding first, as onnxruntime recommends: better INT8 fusions.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        first, last = layer_nodes(onnx.load(str(prepared)).graph)
        excluded = (first if recipe.fp32_first_layer else []) + (
            last if recipe.fp32_last_layer else []
        )
        quantize_static(
            str(prepared),
            str(int8_path),
            Batches(),
            quant_format=QuantFormat[recipe.quant_format],
            activation_type=QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            calibrate_method=CalibrationMethod[recipe.calibration],
            op_types_to_quantize=OPS_TO_QUANTIZE,
            nodes_to_exclude=excluded,
            calibration_providers=["CPUExecutionProvider"],
            extra_options={
                "ActivationSymmetric": recipe.symmetric_activations,
                "WeightSymmetric": True,
            },
        )
    _copy_metadata(fp32_path, int8_path, recipe)
    return int8_path


def _copy_metadata(fp32_path: Path, int8_path: Path, recipe: Int8Recipe) -> None:
    """Keep the FP32 model's metadata (class names, recipe) and say that this copy is INT8."""
    source, target = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    del target.metadata_props[:]
    for prop in source.metadata_props:
        target.metadata_props.add(key=prop.key, value=prop.value)
    target.metadata_props.add(key="quantization", value=f"INT8: {recipe.describe()}")
    target.doc_string = (
        source.doc_string + "; " if source.doc_string else ""
    ) + "statically quantized to INT8"
    onnx.save(target, str(int8_path))


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
    import dataclasses

    from core.repository import write_version

    calibration = pick_calibration_images(train_images, recipe.calibration_images)
    with tempfile.TemporaryDirectory() as scratch:
        int8_path = quantize_int8(fp32.model_path, calibration, Path(scratch) / "int8.onnx", recipe)
        report = check_parity(compare_int8(fp32.model_path, int8_path, test_images, test_labels))
        speed = compare_speed(fp32.model_path, int8_path, test_images)
        onnx_bytes = int8_path.read_bytes()
    metadata = dataclasses.replace(
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
            "quantization": recipe.as_metadata(len(calibration)),
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
    version = write_version(
        repository, f"{fp32.name}{INT8_SUFFIX}", onnx_bytes, metadata, max_batch_size
    )
    return version, report, speed
