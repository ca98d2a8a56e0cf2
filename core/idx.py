"""MNIST-format data sets on disk: IDX files read, checksummed and found. Numpy only.

The four files keep their original names, gzip-compressed or raw. Checksums are those of
the decompressed files: the data folder's own SHA256SUMS when it has one, else the published
sums below. Where a data set is looked for, in order: the folder given (--data-dir), the
data set's environment variable (MNIST_DATA_DIR, FASHION_MNIST_DATA_DIR), then the folder a
Debian package installs. training.data adds Keras' download after these.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import CLASS_NAMES, IMAGE_SIDE

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

KNOWN_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

DATASETS = tuple(CLASS_NAMES)
# The environment variable naming each data set's folder (the Makefile sets both when the
# shared copies exist).
ENV_VARS = {"mnist": "MNIST_DATA_DIR", "fashion-mnist": "FASHION_MNIST_DATA_DIR"}
# Where Debian's packages put the files (apt-get install dataset-fashion-mnist).
DEFAULT_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

# IDX type code 0x08 is unsigned byte, the only type MNIST uses.
_IDX_UBYTE = 0x08


class DatasetError(Exception):
    """A data file is missing, truncated or corrupt; the message names it and says what to do."""


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: list[str]
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray  # uint8 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string (magic 0x0000 08 <ndim>, big-endian dims, uint8 payload)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{name}: not an IDX file (bad magic number); replace it with the original file"
        )
    if data[2] != _IDX_UBYTE:
        raise DatasetError(f"{name}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX header; download the file again")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(
            f"{name}: holds {len(data)} bytes but its header promises {expected} "
            f"(dims {dims}); the file is truncated or corrupt: download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, big-endian dimensions, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(
        int(dim).to_bytes(4, "big") for dim in array.shape
    )
    return header + array.tobytes()


def _read_file(directory: Path, stem: str, dataset: str) -> bytes:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            try:
                return (
                    gzip.decompress(candidate.read_bytes())
                    if candidate.suffix == ".gz"
                    else candidate.read_bytes()
                )
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DatasetError(
                    f"{candidate}: cannot be decompressed ({err}); download it again"
                ) from err
    raise DatasetError(
        f"{directory / stem}(.gz) is missing: put the four MNIST-format files in {directory} "
        f"or point --data-dir / {ENV_VARS.get(dataset, 'MNIST_DATA_DIR')} at the folder that holds them"
    )


def _expected_sums(directory: Path, dataset: str) -> dict[str, str]:
    sums_file = directory / "SHA256SUMS"
    if sums_file.is_file():
        pairs = (line.split() for line in sums_file.read_text().splitlines() if line.strip())
        return {name.lstrip("*").removesuffix(".gz"): digest for digest, name in pairs}
    return KNOWN_SHA256.get(dataset, {})


def load_idx_dir(directory: Path, dataset: str = "mnist") -> Dataset:
    """Read and checksum the four files of an MNIST-format data set from `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(
            f"data folder {directory} does not exist; pass --data-dir with the folder of the IDX files"
        )
    expected = _expected_sums(directory, dataset)
    arrays = {}
    for key, stem in FILES.items():
        raw = _read_file(directory, stem, dataset)
        digest = hashlib.sha256(raw).hexdigest()
        if stem in expected and expected[stem] != digest:
            raise DatasetError(
                f"{directory / stem}: sha256 {digest[:12]}… differs from the expected {expected[stem][:12]}…; "
                f"the file is corrupt or not {dataset}: download it again"
            )
        arrays[key] = parse_idx(raw, str(directory / stem))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.ndim != 3
            or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE)
            or labels.shape != (images.shape[0],)
        ):
            raise DatasetError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} "
                "do not pair up as [N,28,28] and [N]"
            )
    return Dataset(dataset, CLASS_NAMES[dataset], source=str(directory), **arrays)


def find_data_dir(
    dataset: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The folder to read `dataset` from: `data_dir`, else its environment variable, else the
    Debian folder when it exists; None when there is no local copy to read."""
    if dataset not in CLASS_NAMES:
        raise DatasetError(f"unknown data set '{dataset}'; choose one of {', '.join(CLASS_NAMES)}")
    if data_dir:
        return Path(data_dir)
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VARS[dataset]):
        return Path(environ[ENV_VARS[dataset]])
    if dataset in DEFAULT_DIRS and DEFAULT_DIRS[dataset].is_dir():
        return DEFAULT_DIRS[dataset]
    return None
