"""The INT8 model: quantized from the trained FP32 model, published as `<name>_int8` only when it
agrees with the FP32 model on at least 99.5 % of the real test images, and served like any model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from core.repository import load_version
from tests.support.common import run_train
from training.int8_gate import (
    MIN_AGREEMENT,
    Int8ParityError,
    ParityReport,
    check_parity,
    compare_int8,
)
from training.int8_recipe import DEFAULT_RECIPE, Int8Recipe
from training.quantize import layer_nodes, quantize_int8


def test_training_publishes_the_int8_model_beside_the_fp32_one(trained_repository):
    fp32 = load_version(trained_repository, "mnist")
    int8 = load_version(trained_repository, "mnist_int8")
    assert int8.verify_checksum() == int8.metadata.model_sha256
    assert 'name: "mnist_int8"' in (trained_repository / "mnist_int8" / "config.pbtxt").read_text()

    record = json.loads((int8.directory / "metadata.json").read_text())
    assert record["precision"] == "int8"
    assert record["quantization"]["format"] == "QDQ"
    assert record["fp32_model"] == {
        "name": "mnist",
        "version": fp32.version,
        "sha256": fp32.metadata.model_sha256,
        "test_accuracy": pytest.approx(fp32.metadata.onnx_test_accuracy),
    }
    assert record["parity"]["argmax_agreement"] >= MIN_AGREEMENT
    # The bound: INT8 loses at most 0.2 points of test accuracy.
    assert fp32.metadata.onnx_test_accuracy - int8.metadata.test_accuracy <= 0.002

    graph = onnx.load(str(int8.model_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer), (
        "weights should be stored as int8"
    )
    # The default recipe keeps the last layer (the logits) in FP32: its weights stay float, and
    # what reaches the softmax is a float MatMul/Add, not a DequantizeLinear of 8-bit logits.
    assert record["quantization"]["fp32_last_layer"] is True
    _, last = layer_nodes(graph)
    dense = next(node for node in graph.node if node.name == last[0])
    weights = {t.name: t.data_type for t in graph.initializer}
    assert weights.get(dense.input[1]) == onnx.TensorProto.FLOAT, (
        "the last layer's weights are quantized"
    )
    softmax_input = next(node for node in graph.node if node.op_type == "Softmax").input[0]
    assert next(node for node in graph.node if softmax_input in node.output).op_type in (
        "Add",
        "MatMul",
        "Gemm",
    )
    # Its speed beside FP32's, in-process, is measured at batch 1 and 64 and recorded.
    speed = record["speed_vs_fp32"]
    assert set(speed) == {"batch_1", "batch_64"}
    assert all(
        s["fp32_images_per_cpu_s_median"] > 0
        and s["int8_images_per_cpu_s_median"] > 0
        and s["speedup"] > 0
        for s in speed.values()
    )


def test_the_training_summary_reports_the_int8_figures(trained_repository):
    summary = (trained_repository.parent / "summary.txt").read_text()
    int8 = load_version(trained_repository, "mnist_int8")
    record = json.loads((int8.directory / "metadata.json").read_text())
    rows = dict(line.split(" | ", 1) for line in summary.splitlines() if " | " in line)
    rows = {name.strip(): value for name, value in rows.items()}
    parity = record["parity"]
    assert rows["int8 model"].startswith(str(int8.model_path))
    assert DEFAULT_RECIPE.describe() in rows["int8 model"]
    assert (
        f"agrees with FP32 on {parity['agreeing']:,} of 10,000 test images "
        f"({100 * parity['argmax_agreement']:.2f} %)"
    ) in rows["int8 parity"]
    assert f"test accuracy {int8.metadata.test_accuracy:.4f}" in rows["int8 parity"]
    assert "gate: >= 99.5 % agreement, <= 0.2 points lost" in rows["int8 parity"]
    for batch in (1, 64):
        assert (
            f"batch {batch} {record['speed_vs_fp32'][f'batch_{batch}']['speedup']:.2f}x"
            in rows["int8 speed"]
        )


def test_the_recipe_options_change_the_graph(trained_repository, mnist_path, tmp_path):
    """Each option the study compares reaches the quantizer: first/last layers kept in FP32,
    QOperator instead of QDQ, signed activations."""
    from core.idx import load_idx_dir

    fp32 = load_version(trained_repository, "mnist").model_path
    calibration = load_idx_dir(mnist_path).train_images[:200]

    def graph(**options) -> onnx.GraphProto:
        path = quantize_int8(fp32, calibration, tmp_path / "int8.onnx", Int8Recipe(**options))
        return onnx.load(str(path)).graph

    def float_weights(g: onnx.GraphProto, layer: int) -> bool:
        # A quantized layer reads weights from a DequantizeLinear; an FP32 one from a float tensor.
        node = next(n for n in g.node if n.name == layer_nodes(g)[layer][0])
        types = {t.name: t.data_type for t in g.initializer}
        return types.get(node.input[1]) == onnx.TensorProto.FLOAT

    def zero_points(g: onnx.GraphProto) -> dict[int, list[np.ndarray]]:
        found: dict[int, list[np.ndarray]] = {}
        for t in g.initializer:
            if t.name.endswith("_zero_point"):
                found.setdefault(t.data_type, []).append(onnx.numpy_helper.to_array(t))
        return found

    first, last = 0, 1
    everything = graph(fp32_last_layer=False)
    assert not float_weights(everything, first) and not float_weights(everything, last)
    default = graph()
    assert not float_weights(default, first) and float_weights(default, last)
    both = graph(fp32_first_layer=True, fp32_last_layer=True)
    assert float_weights(both, first) and float_weights(both, last)
    assert "QLinearConv" in {n.op_type for n in graph(quant_format="QOperator").node}
    assert onnx.TensorProto.UINT8 in zero_points(everything)  # the default: u8 activations
    signed = zero_points(graph(activations="int8", symmetric_activations=True))
    # (INT32 zero points are the biases'.) Signed symmetric activations: int8 zero points, all 0.
    assert onnx.TensorProto.UINT8 not in signed and not any(
        z.any() for z in signed[onnx.TensorProto.INT8]
    )


def test_the_accuracy_bound_is_part_of_the_gate():
    # 99.6 % agreement passes the first half of the gate, but 0.3 points lost fails the second.
    report = ParityReport(images=10_000, agreeing=9_960, fp32_accuracy=0.9700, int8_accuracy=0.9670)
    with pytest.raises(
        Int8ParityError,
        match=r"96.70 %, 0.30 points below the FP32 model's \(97.00 %\).*at most 0.2",
    ):
        check_parity(report)
    assert check_parity(
        ParityReport(10_000, 9_960, 0.9700, 0.9680)
    ).accuracy_loss_points == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"calibration": "Histogram"},
            "unknown calibration 'Histogram'; use MinMax, Entropy or Percentile",
        ),
        ({"quant_format": "QOp"}, "unknown format 'QOp'; use QDQ or QOperator"),
        ({"activations": "int4"}, "unknown activation type 'int4'; use uint8 or int8"),
        ({"calibration_images": 0}, "at least one calibration image"),
    ],
)
def test_a_bad_recipe_says_what_to_choose(options, message):
    with pytest.raises(ValueError, match=message):
        Int8Recipe(**options)


def test_the_study_prints_a_row_per_variant(trained_repository, mnist_path):
    import os
    import subprocess
    import sys

    from tests.support.common import ROOT

    fp32 = load_version(trained_repository, "mnist").model_path
    result = subprocess.run(
        [sys.executable, "-m", "training.int8_study", str(fp32), "--variants", "before,last-fp32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "MNIST_DATA_DIR": str(mnist_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "%" in line
    ]
    assert [r[1] for r in rows] == ["before", "last-fp32 *"]  # "*": the default recipe
    assert rows[1][2] == DEFAULT_RECIPE.describe() and "every layer INT8" in rows[0][2]
    int8 = load_version(trained_repository, "mnist_int8")
    # The study's default row measures what training published.
    assert rows[1][3] == f"{100 * int8.metadata.parity['argmax_agreement']:.2f} %"
    bad = subprocess.run(
        [sys.executable, "-m", "training.int8_study", str(fp32), "--variants", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "int8_study: error: unknown variant 'nope'"


def test_int8_parity_measured_again_on_the_real_test_set(trained_repository, mnist_test_set):
    images, labels = mnist_test_set
    fp32 = load_version(trained_repository, "mnist")
    int8 = load_version(trained_repository, "mnist_int8")
    report = compare_int8(fp32.model_path, int8.model_path, images, labels)
    assert report.images == 10_000
    assert report.agreement >= MIN_AGREEMENT
    assert report.int8_accuracy == pytest.approx(int8.metadata.test_accuracy)


def test_the_server_serves_the_int8_model(trained_repository, mnist_test_set):
    from serving.client import ClassifierClient
    from serving.process import start_server

    images, labels = mnist_test_set
    with (
        start_server(
            trained_repository, "--model-name", "mnist_int8", "--metrics-port", "0"
        ) as server,
        ClassifierClient(server.target) as client,
    ):
        result = client.classify(images[:64], model_name="mnist_int8")
        probabilities = client.infer_kserve(images[:64], model_name="mnist_int8")
    assert (result.labels == labels[:64]).mean() > 0.9
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)  # the softmax stayed FP32


def test_a_model_too_weak_to_quantize_is_not_published(tmp_path):
    # One epoch on 2,000 images: a model near chance, whose argmax flips under INT8 rounding.
    result = run_train(
        "--limit",
        "2000",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "repo"),
        "--artifacts",
        str(tmp_path / "artifacts"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "repo" / "mnist" / "1" / "model.onnx").exists()
    assert not (tmp_path / "repo" / "mnist_int8").exists()
    assert "INT8 model not published: the INT8 model agrees with the FP32 model on" in result.stderr


def test_parity_error_names_the_count():
    report = ParityReport(images=10_000, agreeing=9_949, fp32_accuracy=0.99, int8_accuracy=0.98)
    with pytest.raises(
        Int8ParityError, match=r"9949 of 10000 test images \(99.49 %\).*at least 9950"
    ):
        check_parity(report)
    assert check_parity(ParityReport(10_000, 9_950, 0.99, 0.99)).agreement == 0.995


def test_no_int8_flag_skips_it(tmp_path):
    result = run_train(
        "--limit",
        "500",
        "--epochs",
        "1",
        "--no-int8",
        "--out",
        str(tmp_path / "repo"),
        "--artifacts",
        str(tmp_path / "artifacts"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "repo" / "mnist_int8").exists()
    assert "not asked for (--no-int8)" in result.stdout


def test_quantizing_needs_calibration_images(trained_repository, tmp_path):
    with pytest.raises(ValueError, match="at least one calibration image"):
        quantize_int8(
            load_version(trained_repository, "mnist").model_path,
            np.zeros((0, 28, 28), np.uint8),
            tmp_path / "int8.onnx",
        )
