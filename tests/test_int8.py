"""The INT8 model: quantized from the trained FP32 model, published as `<name>_int8` only when it
agrees with the FP32 model on at least 99.5 % of the real test images, and served like any model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from core.repository import load_version
from tests.support.common import run_train
from training.quantize import (MIN_AGREEMENT, Int8ParityError, ParityReport, check_parity, compare_int8,
                               quantize_int8)


def test_training_publishes_the_int8_model_beside_the_fp32_one(trained_repository):
    fp32 = load_version(trained_repository, "mnist")
    int8 = load_version(trained_repository, "mnist_int8")
    assert int8.verify_checksum() == int8.metadata.model_sha256
    assert 'name: "mnist_int8"' in (trained_repository / "mnist_int8" / "config.pbtxt").read_text()

    record = json.loads((int8.directory / "metadata.json").read_text())
    assert record["precision"] == "int8"
    assert record["quantization"]["format"] == "QDQ"
    assert record["fp32_model"] == {"name": "mnist", "version": fp32.version, "sha256": fp32.metadata.model_sha256,
                                    "test_accuracy": pytest.approx(fp32.metadata.onnx_test_accuracy)}
    assert record["parity"]["argmax_agreement"] >= MIN_AGREEMENT
    # The bound: INT8 loses at most 0.2 points of test accuracy.
    assert fp32.metadata.onnx_test_accuracy - int8.metadata.test_accuracy <= 0.002

    graph = onnx.load(str(int8.model_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer), "weights should be stored as int8"


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
    with start_server(trained_repository, "--model-name", "mnist_int8", "--metrics-port", "0") as server:
        with ClassifierClient(server.target) as client:
            result = client.classify(images[:64], model_name="mnist_int8")
            probabilities = client.infer_kserve(images[:64], model_name="mnist_int8")
    assert (result.labels == labels[:64]).mean() > 0.9
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)  # the softmax stayed FP32


def test_a_model_too_weak_to_quantize_is_not_published(tmp_path):
    # One epoch on 2,000 images: a model near chance, whose argmax flips under INT8 rounding.
    result = run_train("--limit", "2000", "--epochs", "1", "--out", str(tmp_path / "repo"),
                       "--artifacts", str(tmp_path / "artifacts"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "repo" / "mnist" / "1" / "model.onnx").exists()
    assert not (tmp_path / "repo" / "mnist_int8").exists()
    assert "INT8 model not published: the INT8 model agrees with the FP32 model on" in result.stderr


def test_parity_error_names_the_count():
    report = ParityReport(images=10_000, agreeing=9_949, fp32_accuracy=0.99, int8_accuracy=0.98)
    with pytest.raises(Int8ParityError, match=r"9949 of 10000 test images \(99.49 %\).*at least 9950"):
        check_parity(report)
    assert check_parity(ParityReport(10_000, 9_950, 0.99, 0.99)).agreement == 0.995


def test_no_int8_flag_skips_it(tmp_path):
    result = run_train("--limit", "500", "--epochs", "1", "--no-int8", "--out", str(tmp_path / "repo"),
                       "--artifacts", str(tmp_path / "artifacts"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "repo" / "mnist_int8").exists()
    assert "not asked for (--no-int8)" in result.stdout


def test_quantizing_needs_calibration_images(trained_repository, tmp_path):
    with pytest.raises(ValueError, match="at least one calibration image"):
        quantize_int8(load_version(trained_repository, "mnist").model_path, np.zeros((0, 28, 28), np.uint8),
                      tmp_path / "int8.onnx")
