"""Training's data: the real MNIST files (gzip or raw), IDX parsing, missing, corrupt and truncated
files named in one line, and Fashion-MNIST as a second real dataset."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from core.idx import DatasetError, find_data_dir, load_idx_dir, parse_idx
from tests.support.common import run_train
from tests.support.training_runs import copy_dataset
from training.data import load_dataset


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


def test_missing_file_is_named(mnist_path, tmp_path):
    folder = copy_dataset(mnist_path, tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\(\.gz\) is missing"):
        load_idx_dir(folder)


def test_corrupt_file_fails_its_checksum(mnist_path, tmp_path):
    folder = copy_dataset(mnist_path, tmp_path / "mnist")
    labels = bytearray(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # still a well-formed IDX file: only the checksum can tell
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte: sha256 .* differs from the expected"
    ):
        load_idx_dir(folder)


def test_truncated_gzip_is_a_clear_error(mnist_path, tmp_path):
    folder = copy_dataset(mnist_path, tmp_path / "mnist")
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
