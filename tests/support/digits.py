"""Real MNIST digits and the images made of them for the decoding tests: scaled, encoded, drawn on
paper, and how close a decoded image is to its digit.

Registered as a plugin in tests/conftest.py (the `digits` fixture)."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.inference.errors import InvalidInput


@pytest.fixture(scope="module")
def digits(mnist_path: Path) -> np.ndarray:
    """The first 20 real MNIST test digits, uint8 [20, 28, 28], read straight from the IDX file."""
    packed = mnist_path / "t10k-images-idx3-ubyte.gz"
    with (
        gzip.open(packed, "rb")
        if packed.exists()
        else open(mnist_path / "t10k-images-idx3-ubyte", "rb") as file
    ):
        magic, _count, rows, cols = struct.unpack(">IIII", file.read(16))
        assert magic == 2051, "not an IDX image file"
        return np.frombuffer(file.read(20 * rows * cols), dtype=np.uint8).reshape(20, rows, cols)


def scaled(digit: np.ndarray) -> np.ndarray:
    return digit.astype(np.float32)[..., None] / 255.0


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def drawn_on_paper(digit: np.ndarray, offset: tuple[int, int] = (0, 25)) -> Image.Image:
    """The digit black on white, enlarged 28 -> 100 px on a 100x140 sheet, as a user would draw it."""
    sheet = Image.new("L", (100, 140), 255)
    sheet.paste(Image.fromarray(255 - digit).resize((100, 100), Image.Resampling.BICUBIC), offset)
    return sheet


def similarity(decoded: np.ndarray, digit: np.ndarray) -> tuple[float, float]:
    reference = digit.astype(np.float32) / 255.0
    image = decoded[..., 0]
    return float(np.corrcoef(image.ravel(), reference.ravel())[0, 1]), float(
        np.abs(image - reference).mean()
    )


def raise_message(call, *args) -> str:
    with pytest.raises(InvalidInput) as caught:
        call(*args)
    return str(caught.value)
