"""Static INT8 quantization of the exported FP32 model (the quantization itself).

onnxruntime's quantization tools write a QDQ model: QuantizeLinear/DequantizeLinear pairs around
the convolutions, which onnxruntime fuses into integer kernels (VNNI on CPUs that have it).
Activation ranges come from calibration on training images (min/max), weights are quantized per
output channel (each filter gets its own scale: the filters' ranges differ a lot, and per-channel
costs nothing at run time). The last layer (the dense layer and its logits) and the softmax stay
FP32: 8-bit logits flipped close calls (Int8Recipe), and the probabilities keep their resolution
instead of being rounded to 1/256.

The INT8 model is published only if its answers agree with the FP32 model's on at least 99.5 %
of the 10,000 test images (argmax agreement) and it loses at most 0.2 points of test accuracy;
`check_parity` (training/int8_gate.py) raises otherwise, and training/int8_publish.py publishes
it. The recipe is training/int8_recipe.py, the calibration data training/int8_calibration.py.
docs/int8.md has the study behind the recipe and its figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from training.int8_calibration import calibration_reader
from training.int8_recipe import DEFAULT_RECIPE, Int8Recipe

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
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise ValueError("INT8 quantization needs at least one calibration image")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        # Shape inference and graph folding first, as onnxruntime recommends: better INT8 fusions.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        _quantize_static(
            prepared,
            int8_path,
            calibration_reader(calibration_images, input_name),
            recipe,
            excluded=_fp32_nodes(onnx.load(str(prepared)).graph, recipe),
        )
    _copy_metadata(fp32_path, int8_path, recipe)
    return int8_path


def _fp32_nodes(graph: onnx.GraphProto, recipe: Int8Recipe) -> list[str]:
    """The nodes the recipe keeps in FP32 (its first and/or last layer)."""
    first, last = layer_nodes(graph)
    return (first if recipe.fp32_first_layer else []) + (last if recipe.fp32_last_layer else [])


def _quantize_static(
    prepared: Path, int8_path: Path, reader, recipe: Int8Recipe, excluded: list[str]
) -> None:
    """onnxruntime's quantize_static, its options spelled from the recipe."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(int8_path),
        reader,
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
