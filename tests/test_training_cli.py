"""mnist-train from the command line: the folder's own SHA256SUMS decide, a parity failure exits
non-zero and publishes nothing, and Fashion-MNIST end to end with the export flags."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from core.idx import DatasetError, load_idx_dir
from tests.support.common import ROOT, run_train
from tests.support.training_runs import copy_dataset, fashion_mnist_dir


def _write_sums(folder: Path, digests: dict[str, str]) -> None:
    (folder / "SHA256SUMS").write_text(
        "".join(f"{digest}  {stem}\n" for stem, digest in digests.items())
    )


def test_the_folders_own_sha256sums_decide(mnist_path, tmp_path):
    import hashlib

    folder = copy_dataset(mnist_path, tmp_path / "mnist")
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


def fashion_mnist_dir_or_skip() -> Path:
    folder = fashion_mnist_dir()
    if folder is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Fashion-MNIST is missing under CI: apt-get install dataset-fashion-mnist")
        pytest.skip(
            "Fashion-MNIST not found: set FASHION_MNIST_DATA_DIR or apt-get install dataset-fashion-mnist"
        )
    return folder


# One epoch on 1,000 images, with --opset, --max-batch-size and --validation-split away from their
# defaults.
FASHION_TRAIN_ARGS = (
    *("--limit", "1000", "--epochs", "1", "--optimizer", "adam", "--learning-rate", "0.002"),
    *("--opset", "18", "--max-batch-size", "32", "--validation-split", "0.25"),
    *("--no-int8", "--model-name", "fashion"),
)


def onnx_accuracy(model_path: Path, data) -> float:
    """The share of `data`'s test images that in-process onnxruntime of `model_path` reads right."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    predicted = session.run(
        None, {"images": (data.test_images.astype(np.float32) / 255)[..., None]}
    )[0].argmax(axis=1)
    return float((predicted == data.test_labels).mean())


def test_fashion_mnist_end_to_end_with_the_export_flags(tmp_path):
    """--dataset fashion-mnist through fit, export, parity and publishing, with --opset,
    --max-batch-size and --validation-split set away from their defaults."""
    from core.repository import load_version

    folder = fashion_mnist_dir_or_skip()
    result = run_train(
        *("--dataset", "fashion-mnist", "--data-dir", str(folder), *FASHION_TRAIN_ARGS),
        *("--out", str(tmp_path / "repo"), "--artifacts", str(tmp_path / "artifacts")),
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
    accuracy = onnx_accuracy(version.model_path, load_idx_dir(folder, "fashion-mnist"))
    assert accuracy >= 0.4 and meta.onnx_test_accuracy == pytest.approx(accuracy, abs=1e-4)
