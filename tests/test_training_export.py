"""Training end to end on one small run: fit, export, parity and the Triton model repository it
writes (config.pbtxt, the ONNX interface, metadata, the next version, a parity failure)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from tests.support.common import QUICK_TRAIN_ARGS, run_train


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_run")
    # The article's network with the quick recipe of the serving tests (~95 % on the test digits).
    result = run_train(
        *QUICK_TRAIN_ARGS, "--out", str(root / "repo"), "--artifacts", str(root / "artifacts")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_end_to_end_writes_a_triton_repository(small_run):
    root, result = small_run
    model_dir = root / "repo" / "mnist"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["metadata.json", "model.onnx"]
    for png in ("training_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (root / "artifacts" / "mnist-v1" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "artifacts" / "mnist-v1" / "model.keras").is_file()
    for row in (
        "recipe",
        "epochs",
        "wall time",
        "train accuracy",
        "val accuracy",
        "test accuracy",
        "parity",
    ):
        assert any(line.startswith(row) for line in result.stdout.splitlines()), row


def test_config_pbtxt_is_a_valid_triton_model_config(small_run):
    from tritonclient.grpc import model_config_pb2

    root, _ = small_run
    config = text_format.Parse(
        (root / "repo" / "mnist" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (
        config.name == "mnist"
        and config.platform == "onnxruntime_onnx"
        and config.max_batch_size == 64
    )
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("images", model_config_pb2.TYPE_FP32, [28, 28, 1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("probabilities", model_config_pb2.TYPE_FP32, [10])
    ]
    assert config.HasField("dynamic_batching")


def test_onnx_model_interface_and_metadata(small_run):
    root, _ = small_run
    model = onnx.load(root / "repo" / "mnist" / "1" / "model.onnx")
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda t: [d.dim_value or d.dim_param or None for d in t.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp)[1:] == [28, 28, 1] and isinstance(
        dims(inp)[0], (str, type(None))
    )  # dynamic batch
    assert out.name == "probabilities" and dims(out)[1:] == [10]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == [str(i) for i in range(10)]
    assert props["recipe"] == "article"
    assert {"trained_at", "source_revision"} <= set(props)


def test_published_model_reads_the_test_digits_as_well_as_it_claims(small_run, mnist_test_set):
    """Recomputed here with onnxruntime on the 10,000 test images from disk, not read from the run."""
    import onnxruntime as ort

    from core.repository import load_version

    root, _ = small_run
    version = load_version(root / "repo", "mnist")
    images, labels = mnist_test_set
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"images": (images.astype(np.float32) / 255)[..., None]})[
        0
    ].argmax(axis=1)
    accuracy = float((predicted == labels).mean())
    # 5,400 images, two epochs: a competent reader of digits, and exactly what the run reported.
    assert accuracy >= 0.90, accuracy
    assert version.metadata.onnx_test_accuracy == pytest.approx(accuracy, abs=1e-4)
    props = {p.key: p.value for p in onnx.load(version.model_path).metadata_props}
    assert float(props["test_accuracy"]) == pytest.approx(version.metadata.test_accuracy, abs=1e-4)
    assert abs(version.metadata.test_accuracy - accuracy) <= 1e-3  # Keras' own figure agrees too


def test_keras_and_onnx_agree_recomputed_here(small_run, mnist_test_set):
    """Parity measured by the test itself: the saved Keras model against the published ONNX file."""
    import onnxruntime as ort

    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from core.repository import load_version

    root, _ = small_run
    version = load_version(root / "repo", "mnist")
    images = (mnist_test_set[0].astype(np.float32) / 255)[..., None]
    keras_model = keras.models.load_model(root / "artifacts" / "mnist-v1" / "model.keras")
    by_keras = keras_model.predict(images, batch_size=1000, verbose=0)
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    by_onnx = session.run(None, {"images": images})[0]
    max_diff = float(np.abs(by_keras - by_onnx).max())
    assert max_diff <= 1e-4 and (by_keras.argmax(axis=1) == by_onnx.argmax(axis=1)).all()
    assert version.metadata.parity["max_abs_diff"] == pytest.approx(max_diff, rel=0.5, abs=1e-7)


def test_metadata_records_parity_and_checksum(small_run):
    from core.repository import load_version, sha256_of

    root, _ = small_run
    version = load_version(root / "repo", "mnist")
    meta = version.metadata
    assert meta.model_sha256 == sha256_of(version.model_path)
    assert meta.parity["images"] == 10000 and meta.parity["max_abs_diff"] <= 1e-4
    assert meta.parity["argmax_mismatches"] == 0
    assert meta.parameters == 62346 and meta.hyperparameters["batch_size"] == 100
    assert meta.hyperparameters["epochs"] == 2 and meta.hyperparameters["optimizer"] == "adam"
    assert (meta.train_images, meta.validation_images) == (5400, 600)  # --limit 6000, the 0.1 split
    assert abs(meta.test_accuracy - meta.onnx_test_accuracy) < 1e-3
    assert meta.wall_seconds > 0 and meta.recipe == "article"


def test_a_new_run_adds_the_next_version(small_run, tmp_path):
    root, _ = small_run
    repository = (
        tmp_path / "repo"
    )  # a copy of its own: the module's repository keeps exactly version 1
    shutil.copytree(root / "repo", repository)
    before = (repository / "mnist" / "1" / "model.onnx").read_bytes()
    result = run_train(
        "--limit",
        "500",
        "--epochs",
        "1",
        "--no-int8",
        "--out",
        str(repository),
        "--artifacts",
        str(tmp_path / "artifacts"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (repository / "mnist").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (repository / "mnist" / "2" / "model.onnx").is_file()
    assert (repository / "mnist" / "1" / "model.onnx").read_bytes() == before
    assert (tmp_path / "artifacts" / "mnist-v2" / "model.keras").is_file()


def test_parity_failure_names_the_images(small_run, mnist_test_set):
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from training.data import to_model_input
    from training.verify import ParityError, check_parity

    root, _ = small_run
    keras_model = keras.models.load_model(root / "artifacts" / "mnist-v1" / "model.keras")
    onnx_model = onnx.load(root / "repo" / "mnist" / "1" / "model.onnx")
    # Nudge the final bias: the exported graph no longer computes what Keras computes.
    bias = max(onnx_model.graph.initializer, key=lambda t: t.dims == [10])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    images, labels = mnist_test_set
    inputs = to_model_input(images[:200])
    # Which images differ, worked out here: Keras against onnxruntime on the nudged graph.
    import onnxruntime as ort

    nudged = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    per_image = np.abs(
        keras_model.predict(inputs, verbose=0) - nudged.run(None, {"images": inputs})[0]
    ).max(axis=1)
    differing = np.flatnonzero(per_image > 1e-4).tolist()
    assert differing, "the nudge must change some probabilities"
    first = ", ".join(map(str, differing[:3]))
    with pytest.raises(
        ParityError,
        match=rf"ONNX differs from Keras: max \|Δp\| .* on {len(differing)} images \({first}",
    ):
        check_parity(keras_model, onnx_model.SerializeToString(), inputs, labels[:200])
