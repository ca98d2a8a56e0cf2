"""Training stage: data reading, the article's network, export, parity, the model repository."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from core.idx import DatasetError, find_data_dir, load_idx_dir, parse_idx
from tests.support.common import QUICK_TRAIN_ARGS, ROOT, run_train
from training.data import load_dataset

# --- data -------------------------------------------------------------------------------------


def test_reads_the_real_mnist_files(mnist_path):
    data = load_idx_dir(mnist_path)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(data.train_labels)[:2].tolist() == [5923, 6742]


def test_reads_raw_uncompressed_files_too(mnist_path, tmp_path):
    for gz in mnist_path.glob("*.gz"):
        (tmp_path / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    data = load_idx_dir(tmp_path)
    assert data.test_labels[:3].tolist() == [7, 2, 1]


def test_parse_idx_rejects_bad_magic_and_truncation():
    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert parse_idx(good).tolist() == [1, 2, 3]
    with pytest.raises(DatasetError, match="bad magic"):
        parse_idx(b"\x1f\x8b\x08\x00" + good[4:])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        parse_idx(good[:-1], "labels")


def _copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        shutil.copy(path, dst / path.name)
    return dst


def test_missing_file_is_named(mnist_path, tmp_path):
    folder = _copy_dataset(mnist_path, tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\(\.gz\) is missing"):
        load_idx_dir(folder)


def test_corrupt_file_fails_its_checksum(mnist_path, tmp_path):
    folder = _copy_dataset(mnist_path, tmp_path / "mnist")
    labels = bytearray(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # still a well-formed IDX file: only the checksum can tell
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte: sha256 .* differs from the expected"
    ):
        load_idx_dir(folder)


def test_truncated_gzip_is_a_clear_error(mnist_path, tmp_path):
    folder = _copy_dataset(mnist_path, tmp_path / "mnist")
    blob = (folder / "train-labels-idx1-ubyte.gz").read_bytes()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="cannot be decompressed"):
        load_idx_dir(folder)


def test_cli_reports_a_bad_data_folder_in_one_line(tmp_path):
    result = run_train(
        "--data-dir",
        str(tmp_path / "nowhere"),
        "--limit",
        "10",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "repo"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in result.stderr


def test_fashion_mnist_is_a_second_real_dataset():
    folder = find_data_dir("fashion-mnist")
    if folder is None:
        how = (
            "set FASHION_MNIST_DATA_DIR to the folder of its IDX files (`make test` does when "
            "../shared/datasets/fashion-mnist exists) or apt-get install dataset-fashion-mnist"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST is missing under CI: {how}")
        pytest.skip(f"Fashion-MNIST not found: {how}")
    data = load_dataset("fashion-mnist")
    assert data.source == str(folder)
    assert data.class_names[9] == "Ankle boot" and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


# --- the network -----------------------------------------------------------------------------


def test_article_network_shapes_and_parameters():
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from training.model import build_article_cnn

    model = build_article_cnn()
    shapes = [tuple(layer.output.shape) for layer in model.layers]
    params = [layer.count_params() for layer in model.layers]
    assert shapes == [
        (None, 24, 24, 32),
        (None, 12, 12, 32),
        (None, 8, 8, 64),
        (None, 4, 4, 64),
        (None, 1024),
        (None, 10),
    ]
    assert params == [832, 0, 51264, 0, 0, 10250]
    assert model.count_params() == 62346


def test_summary_flag_prints_the_keras_summary():
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "--summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "62,346" in result.stdout and "(None, 8, 8, 64)" in result.stdout
    assert result.stderr.strip() == "", "TensorFlow's import chatter must not reach the user"


def test_summary_table_lines_up():
    from training.cli import summary_table

    table = summary_table([("recipe", "article"), ("test accuracy", "0.9704")]).splitlines()
    assert table[1] == "recipe        | article" and table[2] == "test accuracy | 0.9704"
    assert table[0] == table[-1] and set(table[0]) == {"-"}


def test_same_seed_same_model(mnist_path):
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from training.config import make_config
    from training.fit import fit

    data = load_idx_dir(mnist_path)
    config = make_config("article", {"epochs": 1}, limit=1000, seed=7)
    first, second = fit(config, data, verbose=0), fit(config, data, verbose=0)
    assert first.test_accuracy == second.test_accuracy
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)


# --- end to end: fit → export → parity → repository ---------------------------------------------


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


# --- the folder's SHA256SUMS, a parity failure through the CLI, flags and Fashion-MNIST ------------


def _write_sums(folder: Path, digests: dict[str, str]) -> None:
    (folder / "SHA256SUMS").write_text(
        "".join(f"{digest}  {stem}\n" for stem, digest in digests.items())
    )


def test_the_folders_own_sha256sums_decide(mnist_path, tmp_path):
    import hashlib

    folder = _copy_dataset(mnist_path, tmp_path / "mnist")
    labels = bytearray(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 0] = 3  # the first test label is 7 in MNIST; this folder's copy says 3
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    digests = {
        gz.stem: hashlib.sha256(gzip.decompress(gz.read_bytes())).hexdigest()
        for gz in folder.glob("*.gz")
    }
    _write_sums(folder, digests)  # sums of this folder's files: they are accepted as they are
    assert load_idx_dir(folder).test_labels[0] == 3
    _write_sums(
        folder, {**digests, "train-images-idx3-ubyte": "0" * 64}
    )  # a sum that no longer matches
    with pytest.raises(
        DatasetError,
        match=r"train-images-idx3-ubyte: sha256 .* differs from the expected 000000000000",
    ):
        load_idx_dir(folder)


# The exporter made to disagree with Keras (its final bias nudged), as a broken converter would.
PARITY_BREAK = """
import sys
import onnx
from onnx import numpy_helper
import training.export as export

original = export.export_onnx

def drifting_export(*args, **kwargs):
    model = original(*args, **kwargs)
    bias = max(model.graph.initializer, key=lambda t: list(t.dims) == [10])
    values = numpy_helper.to_array(bias).copy()
    values[3] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return model

export.export_onnx = drifting_export
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_parity_failure_exits_non_zero_and_publishes_nothing(mnist_path, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PARITY_BREAK,
            "--limit",
            "500",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "repo"),
            "--artifacts",
            str(tmp_path / "artifacts"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "MNIST_DATA_DIR": str(mnist_path)},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-train: error: ParityError: ONNX differs from Keras"), last
    assert "Traceback" not in result.stderr
    published = (
        [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
        if (tmp_path / "repo").exists()
        else []
    )
    assert published == [], (
        published
    )  # no model.onnx, no metadata.json, no config.pbtxt, no INT8 copy


def fashion_mnist_dir() -> Path | None:
    """Fashion-MNIST's folder ($FASHION_MNIST_DATA_DIR, the shared copy, or Debian's package)."""
    shared = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
    if not os.environ.get("FASHION_MNIST_DATA_DIR") and shared.is_dir():
        return shared
    return find_data_dir("fashion-mnist")


def test_fashion_mnist_end_to_end_with_the_export_flags(tmp_path):
    """--dataset fashion-mnist through fit, export, parity and publishing, with --opset,
    --max-batch-size and --validation-split set away from their defaults."""
    import onnxruntime as ort

    from core.repository import load_version

    folder = fashion_mnist_dir()
    if folder is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Fashion-MNIST is missing under CI: apt-get install dataset-fashion-mnist")
        pytest.skip(
            "Fashion-MNIST not found: set FASHION_MNIST_DATA_DIR or apt-get install dataset-fashion-mnist"
        )
    result = run_train(
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(folder),
        "--limit",
        "1000",
        "--epochs",
        "1",
        "--optimizer",
        "adam",
        "--learning-rate",
        "0.002",
        "--opset",
        "18",
        "--max-batch-size",
        "32",
        "--validation-split",
        "0.25",
        "--no-int8",
        "--model-name",
        "fashion",
        "--out",
        str(tmp_path / "repo"),
        "--artifacts",
        str(tmp_path / "artifacts"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version = load_version(tmp_path / "repo", "fashion")
    meta = version.metadata
    assert meta.dataset == "fashion-mnist" and meta.class_names[9] == "Ankle boot"
    assert (meta.train_images, meta.validation_images) == (
        750,
        250,
    )  # --validation-split 0.25 of --limit 1000
    model = onnx.load(version.model_path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (tmp_path / "repo" / "fashion" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "fashion" and config.max_batch_size == 32
    # The published model reads Fashion-MNIST's own test images (from the folder) far above chance (0.1):
    # 750 images, one epoch give about 0.55.
    data = load_idx_dir(folder, "fashion-mnist")
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    predicted = session.run(
        None, {"images": (data.test_images.astype(np.float32) / 255)[..., None]}
    )[0].argmax(axis=1)
    accuracy = float((predicted == data.test_labels).mean())
    assert accuracy >= 0.4 and meta.onnx_test_accuracy == pytest.approx(accuracy, abs=1e-4)
