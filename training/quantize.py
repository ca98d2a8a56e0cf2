"""Static INT8 quantization of the exported FP32 model, and the parity check that gates publishing it.

onnxruntime's quantization tools write a QDQ model: QuantizeLinear/DequantizeLinear pairs around
the convolutions and the dense layer, which onnxruntime fuses into integer kernels (VNNI on CPUs
that have it). Activation ranges come from calibration on training images (min/max), weights are
quantized per output channel (each filter gets its own scale: the filters' ranges differ a lot,
and per-channel costs nothing at run time). The softmax stays FP32, so the probabilities keep
their resolution instead of being rounded to 1/256.

The INT8 model is published only if its answers agree with the FP32 model's on at least 99.5 %
of the 10,000 test images (argmax agreement); `check_parity` raises otherwise.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import onnx

from core.contract import to_model_input  # the pixels as the server feeds them

if TYPE_CHECKING:
    from core.repository import ModelVersion

MIN_AGREEMENT = 0.995
INT8_SUFFIX = "_int8"  # the INT8 copy of model `mnist` is published as model `mnist_int8`
CALIBRATION_IMAGES = 1000  # enough for stable min/max ranges; more only slows the export
CALIBRATION_BATCH = 100
# Quantized: where the arithmetic is. MaxPool and Reshape/Flatten pass the quantized tensors through.
OPS_TO_QUANTIZE = ["Conv", "MatMul", "Gemm", "MaxPool", "Relu", "Add", "Reshape", "Flatten", "Transpose"]


class Int8ParityError(RuntimeError):
    """The INT8 model disagrees with the FP32 model on too many test images to be published."""


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


def pick_calibration_images(train_images: np.ndarray, count: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """A fixed random sample of the training images: reproducible scales, every digit represented."""
    rng = np.random.default_rng(seed)
    return train_images[rng.choice(len(train_images), size=min(count, len(train_images)), replace=False)]


def quantize_int8(fp32_path: Path, calibration_images: np.ndarray, int8_path: Path) -> Path:
    """Write a statically quantized (QDQ, per-channel weights, U8 activations / S8 weights) copy of `fp32_path`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise ValueError("INT8 quantization needs at least one calibration image")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(to_model_input(calibration_images),
                                                max(1, len(calibration_images) // CALIBRATION_BATCH)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        # Shape inference and graph folding first, as onnxruntime recommends: better fused INT8 kernels.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(int8_path), Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,  # U8 activations x S8 weights: the VNNI instruction's form
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=OPS_TO_QUANTIZE,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    _copy_metadata(fp32_path, int8_path)
    return int8_path


def _copy_metadata(fp32_path: Path, int8_path: Path) -> None:
    """Keep the FP32 model's metadata (class names, recipe) and say that this copy is INT8."""
    source, target = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    del target.metadata_props[:]
    for prop in source.metadata_props:
        target.metadata_props.add(key=prop.key, value=prop.value)
    target.metadata_props.add(key="quantization", value="static INT8, QDQ, per-channel weights, MinMax calibration")
    target.doc_string = (source.doc_string + "; " if source.doc_string else "") + "statically quantized to INT8"
    onnx.save(target, str(int8_path))


def predict_labels(model_path: Path, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """argmax of the model's output on uint8 [N, 28, 28] images, in batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: to_model_input(images[i:i + batch])})[0].argmax(axis=1)
                           for i in range(0, len(images), batch)])


def compare_int8(fp32_path: Path, int8_path: Path, test_images: np.ndarray, test_labels: np.ndarray) -> ParityReport:
    """Both models on the test images: how many answers agree, and each model's accuracy."""
    fp32, int8 = predict_labels(fp32_path, test_images), predict_labels(int8_path, test_images)
    return ParityReport(images=len(test_images), agreeing=int((fp32 == int8).sum()),
                        fp32_accuracy=float((fp32 == test_labels).mean()),
                        int8_accuracy=float((int8 == test_labels).mean()))


def check_parity(report: ParityReport, minimum: float = MIN_AGREEMENT) -> ParityReport:
    """Raise Int8ParityError unless the INT8 model agrees with the FP32 model on `minimum` of the images."""
    if report.agreement < minimum:
        needed = int(np.ceil(minimum * report.images))
        raise Int8ParityError(
            f"the INT8 model agrees with the FP32 model on {report.agreeing} of {report.images} test images "
            f"({100 * report.agreement:.2f} %); publishing it needs at least {needed} ({100 * minimum:g} %)")
    return report


def publish_int8(repository: Path, fp32: ModelVersion, train_images: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, max_batch_size: int) -> tuple[ModelVersion, ParityReport]:
    """Quantize the published FP32 version and publish the INT8 copy as `<name>_int8`, parity permitting.

    The INT8 model is a model of its own in the repository (its own config.pbtxt and versions), so a
    server serves one or the other by --model-name. Raises Int8ParityError, publishing nothing, when
    it disagrees with the FP32 model on more than 0.5 % of the test images.
    """
    import dataclasses

    from core.repository import write_version

    with tempfile.TemporaryDirectory() as scratch:
        int8_path = quantize_int8(fp32.model_path, pick_calibration_images(train_images), Path(scratch) / "int8.onnx")
        report = check_parity(compare_int8(fp32.model_path, int8_path, test_images, test_labels))
        onnx_bytes = int8_path.read_bytes()
    metadata = dataclasses.replace(
        fp32.metadata,
        test_accuracy=report.int8_accuracy,
        onnx_test_accuracy=report.int8_accuracy,
        parity={"images": report.images, "argmax_agreement": report.agreement, "agreeing": report.agreeing,
                "minimum_agreement": MIN_AGREEMENT, "compared_with": f"{fp32.name} v{fp32.version}"},
        extra={**fp32.metadata.extra,
               "precision": "int8",
               "quantization": {"method": "static", "format": "QDQ", "activations": "uint8", "weights": "int8",
                                "per_channel": True, "calibration": "MinMax",
                                "calibration_images": min(CALIBRATION_IMAGES, len(train_images))},
               "fp32_model": {"name": fp32.name, "version": fp32.version, "sha256": fp32.metadata.model_sha256,
                              "test_accuracy": report.fp32_accuracy},
               "accuracy_loss_points": round(report.accuracy_loss_points, 4)},
    )
    version = write_version(repository, f"{fp32.name}{INT8_SUFFIX}", onnx_bytes, metadata, max_batch_size)
    return version, report
