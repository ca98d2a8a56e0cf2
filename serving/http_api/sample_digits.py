"""Regenerate the page's sample of MNIST test digits: static/digits.png and static/digits.json.

The page's "random MNIST test digit" button draws one of the first 100 test images, which the
package ships as one 280x280 grayscale PNG (10 x 10 digits, row-major, MNIST's own pixels) and
their labels, so the page needs neither the data set nor the network at run time.

    python -m serving.http_api.sample_digits --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from core.contract import IMAGE_SIDE
from core.idx import load_idx_dir

COUNT, PER_ROW = 100, 10
STATIC = Path(__file__).parent / "static"


def sprite(images: np.ndarray) -> np.ndarray:
    """uint8 digits [100, 28, 28] to one [280, 280] sheet, 10 per row."""
    rows = images.reshape(COUNT // PER_ROW, PER_ROW, IMAGE_SIDE, IMAGE_SIDE)
    return rows.transpose(0, 2, 1, 3).reshape(COUNT // PER_ROW * IMAGE_SIDE, PER_ROW * IMAGE_SIDE)


def unsprite(sheet: np.ndarray) -> np.ndarray:
    """The inverse of sprite(): a [280, 280] sheet to digits [100, 28, 28]."""
    rows = sheet.reshape(COUNT // PER_ROW, IMAGE_SIDE, PER_ROW, IMAGE_SIDE)
    return rows.transpose(0, 2, 1, 3).reshape(COUNT, IMAGE_SIDE, IMAGE_SIDE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="folder with MNIST's IDX files"
    )
    args = parser.parse_args(argv)
    data = load_idx_dir(args.data_dir, "mnist")
    Image.fromarray(sprite(data.test_images[:COUNT]), mode="L").save(
        STATIC / "digits.png", optimize=True
    )
    (STATIC / "digits.json").write_text(
        json.dumps(
            {
                "source": "MNIST test set, images 0-99 "
                "(Yann LeCun, Corinna Cortes, Christopher J.C. Burges; CC BY-SA 3.0)",
                "per_row": PER_ROW,
                "labels": [int(label) for label in data.test_labels[:COUNT]],
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
