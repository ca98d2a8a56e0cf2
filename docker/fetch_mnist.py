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

from core.contract import CLASS_NAMES
from core.idx import FILES, KNOWN_SHA256, Dataset, DatasetError, idx_bytes


def download_mnist() -> Dataset:
    """MNIST through Keras' download (the trainer image has Keras; this script needs nothing else of training)."""
    import keras  # imported here: TensorFlow is slow to import

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as err:  # keras raises a bare Exception on a failed download
        raise DatasetError(
            f"could not download MNIST ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        ) from err
    return Dataset(
        "mnist",
        CLASS_NAMES["mnist"],
        x_train,
        y_train,
        x_test,
        y_test,
        source="keras.datasets download",
    )


def write_idx_dir(data: Dataset, directory: Path) -> None:
    """Write the four files, train-images last: its presence is what says "MNIST is here"."""
    contents = {FILES[key]: idx_bytes(getattr(data, key)) for key in FILES}
    for name, content in contents.items():
        digest = hashlib.sha256(content).hexdigest()
        if digest != KNOWN_SHA256["mnist"][name]:
            raise DatasetError(
                f"{name}: the download gives sha256 {digest[:12]}…, not MNIST's; try again"
            )
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
    try:
        data = download_mnist()
        write_idx_dir(data, Path(argv[0]))
    except (DatasetError, OSError) as err:
        print(f"fetch_mnist: error: {err}", file=sys.stderr)
        return 1
    print(
        f"fetch_mnist: MNIST written to {argv[0]} "
        f"({len(data.train_images):,} training + {len(data.test_images):,} test images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
