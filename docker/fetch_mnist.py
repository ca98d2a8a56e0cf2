"""Download MNIST (Keras' copy) and write it as the four IDX files that mnist-train and the load test read.

    python docker/fetch_mnist.py FOLDER

docker/train-if-needed.sh runs it in the trainer container when the host mounts no MNIST folder,
so that the `mnist` volume then holds the same files for the trainer and the Locust workers. Each
file is checked against MNIST's published SHA-256 sum before it is written.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from training.data import FILES, KNOWN_SHA256, Dataset, DatasetError, load_dataset


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, big-endian dimensions, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(dim).to_bytes(4, "big") for dim in array.shape)
    return header + array.tobytes()


def write_idx_dir(data: Dataset, directory: Path) -> None:
    """Write the four files, train-images last: its presence is what says "MNIST is here"."""
    contents = {FILES[key]: idx_bytes(getattr(data, key)) for key in FILES}
    for name, content in contents.items():
        digest = hashlib.sha256(content).hexdigest()
        if digest != KNOWN_SHA256["mnist"][name]:
            raise DatasetError(f"{name}: the download gives sha256 {digest[:12]}…, not MNIST's; try again")
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(contents, key=lambda name: name == FILES["train_images"]):
        partial = directory / f".{name}.partial"
        partial.write_bytes(contents[name])
        os.replace(partial, directory / name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python docker/fetch_mnist.py FOLDER", file=sys.stderr)
        return 2
    os.environ.pop("MNIST_DATA_DIR", None)  # so that load_dataset downloads
    try:
        data = load_dataset("mnist")
        write_idx_dir(data, Path(argv[0]))
    except (DatasetError, OSError) as err:
        print(f"fetch_mnist: error: {err}", file=sys.stderr)
        return 1
    print(f"fetch_mnist: MNIST written to {argv[0]} "
          f"({len(data.train_images):,} training + {len(data.test_images):,} test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
