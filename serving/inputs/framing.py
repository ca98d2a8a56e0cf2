"""Encoded images (PNG, JPEG) of any size to a 28x28 digit framed the way MNIST was made.

Grayscale, transparency laid on white, dark-on-light inverted, then the ink cropped, scaled
so its longer side is 20 px and centred by mass in the 28x28 field. Pure functions; the
file's size is bounded before it is decoded: each image's sides, and the pixels of all a call's
images together (check_pixel_budget, from the headers alone). Raises InvalidInput saying what
is wrong, in words of its own: Pillow's messages may hold object reprs ("<_io.BytesIO object at
0x...>"), which tell the caller nothing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image

from core.contract import IMAGE_SIDE as SIDE
from core.contract import scale_pixels
from serving.inference.errors import InvalidInput

# MNIST scaled every digit so the longer side of its ink box is 20 px, then put the
# ink's centre of mass at pixel (14, 14) of the 28x28 field (measured on the test set).
_INK_BOX = 20
_CENTRE = 14.0
_MAX_ENCODED_SIDE = 4096  # larger files are refused before decoding: decompression bombs
# Decoded pixels per call, all encoded images together (--max-decoded-pixels): one 4096x4096
# image, or 64 of 512x512. Decoding that many takes about a second of one core and ~150 MB.
DEFAULT_MAX_DECODED_PIXELS = _MAX_ENCODED_SIDE * _MAX_ENCODED_SIDE
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
# After stretching the ink to [0, 1], fainter pixels are JPEG ringing or paper texture.
_NOISE_FLOOR = 0.1
# Less spread than this between background and the darkest ink means no digit at all.
_MIN_CONTRAST = 0.1
_ENCODED_FORMATS = ("PNG", "JPEG")
T = TypeVar("T")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"iVBORw0KGgo", "base64 text of a PNG"),
    (b"/9j/", "base64 text of a JPEG"),
)


def decode_encoded_image(data: bytes) -> np.ndarray:
    """A PNG or JPEG of a digit, any size, to a (28, 28, 1) float32 image framed like MNIST."""
    gray = _read_grayscale(data)
    if _background_is_light(gray):
        gray = 1.0 - gray
    elif gray.shape == (SIDE, SIDE):
        # Already in MNIST's frame: keep its pixels so a PNG of an MNIST digit is that digit.
        return gray.reshape(SIDE, SIDE, 1)
    return _fit_to_mnist_frame(gray).reshape(SIDE, SIDE, 1)


def set_pillow_limit(max_decoded_pixels: int) -> None:
    """Pillow's own decompression-bomb limit, from the server's per-call budget.

    Pillow warns above Image.MAX_IMAGE_PIXELS and refuses above twice that; our budget check
    comes first, so this is the second line of defence (and it covers code that opens images
    without it).
    """
    Image.MAX_IMAGE_PIXELS = max_decoded_pixels


def encoded_size(data: bytes) -> tuple[int, int]:
    """An encoded image's (width, height) from its header alone; no pixel is decoded."""
    _check_format(data)
    size = _open_failure(data, lambda image: image.size)
    if isinstance(size, InvalidInput):
        raise size
    _check_dimensions(size)
    return size


def check_pixel_budget(blobs: Sequence[bytes], max_decoded_pixels: int) -> None:
    """Refuse a call whose encoded images would decode to more than `max_decoded_pixels` pixels."""
    total = 0
    for index, data in enumerate(blobs):
        try:
            width, height = encoded_size(data)
        except InvalidInput as error:
            # The image's own error; decode_classify_images would name it the same way.
            raise InvalidInput(f"image {index}: {error}") from None
        total += width * height
    if total > max_decoded_pixels:
        raise InvalidInput(
            f"the request's encoded images hold {total:,} pixels once decoded; the limit is "
            f"{max_decoded_pixels:,} per call (--max-decoded-pixels): send fewer or smaller images"
        )


def _read_grayscale(data: bytes) -> np.ndarray:
    """A PNG or JPEG file to a float32 [H, W] array in [0, 1], transparency laid on white."""
    _check_format(data)

    def decode(image: Image.Image) -> np.ndarray:
        _check_dimensions(image.size)
        image.load()
        return _to_grayscale(image)

    result = _open_failure(data, decode)
    if isinstance(result, InvalidInput):
        raise result
    return result


def _open_failure(data: bytes, use: Callable[[Image.Image], T]) -> T | InvalidInput:
    """`use(image)` on the opened file, or the InvalidInput that says why the file is bad.

    The error is returned, not raised from inside the `except` block: the decoder's exception
    and its traceback (which holds the file's bytes and half-decoded pixels) are dropped here,
    at once, rather than chained to the caller's error and kept until the cyclic collector runs.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_ENCODED_FORMATS) as image:
            return use(image)
    except InvalidInput as error:
        return InvalidInput(str(error))
    # Pillow refuses (or, where warnings are errors, warns about) huge headers before our own check.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return InvalidInput(
            f"encoded image is too large to decode safely; the limit is "
            f"{_MAX_ENCODED_SIDE}x{_MAX_ENCODED_SIDE} and {Image.MAX_IMAGE_PIXELS:,} pixels: downscale it first"
        )
    # Decoders fail on hostile or broken files in many ways (OSError, SyntaxError,
    # zlib.error, struct.error...); all of them mean the client sent a bad file.
    except Exception as error:  # noqa: BLE001
        return InvalidInput(
            f"encoded bytes could not be decoded as {_sniff(data)} ({_describe(error)}); "
            "send a complete, uncorrupted PNG or JPEG file"
        )


def _describe(error: Exception) -> str:
    """A decoder's error in a few words, without object reprs ("<_io.BytesIO object at 0x...>")."""
    text = _OBJECT_REPR.sub("", str(error)).strip() or type(error).__name__
    return text if len(text) <= 120 else text[:120] + "…"


def _sniff(data: bytes) -> str | None:
    return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), None)


def _check_format(data: bytes) -> None:
    if not data:
        raise InvalidInput("encoded holds no bytes; send the contents of a PNG or JPEG file")
    kind = _sniff(data)
    if kind in _ENCODED_FORMATS:
        return
    if kind is None:
        raise InvalidInput(
            f"encoded is not a PNG or JPEG file (it starts with {data[:8].hex(' ')}); "
            "send the file's bytes, or raw_pixels for 28x28 uint8 pixels"
        )
    if kind.startswith("base64"):
        raise InvalidInput(
            f"encoded holds {kind}; send the decoded file bytes (protobuf bytes need no base64)"
        )
    raise InvalidInput(
        f"encoded holds a {kind} image; only PNG and JPEG are accepted: re-encode it as PNG"
    )


def _check_dimensions(size: tuple[int, int]) -> None:
    width, height = size
    if width > _MAX_ENCODED_SIDE or height > _MAX_ENCODED_SIDE:
        raise InvalidInput(
            f"encoded image is {width}x{height} pixels; the limit is "
            f"{_MAX_ENCODED_SIDE}x{_MAX_ENCODED_SIDE}: downscale it first"
        )


def _to_grayscale(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale PNG: Pillow's conversion to 8 bits would clip, so scale here.
        return np.asarray(image, dtype=np.float32) / np.float32(65535.0)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return scale_pixels(np.asarray(image.convert("L")))


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def _background_is_light(gray: np.ndarray) -> bool:
    return float(_border(gray).mean()) > 0.5


def _fit_to_mnist_frame(ink: np.ndarray) -> np.ndarray:
    """Light-on-dark ink of any size to 28x28 the way MNIST was made: crop, scale to 20 px, centre by mass."""
    background = float(np.median(_border(ink)))
    peak = float(ink.max())
    if peak - background < _MIN_CONTRAST:
        return np.zeros((SIDE, SIDE), dtype=np.float32)
    # Stretch so a grey-pencil or photographed digit spans [0, 1] like MNIST's ink.
    ink = np.clip((ink - background) / (peak - background), 0.0, 1.0).astype(np.float32)
    ink[ink < _NOISE_FLOOR] = 0.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return _centre_by_mass(_scale_longer_side(crop, _INK_BOX))


def _scale_longer_side(crop: np.ndarray, target: int) -> np.ndarray:
    height, width = crop.shape
    scale = target / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # Lanczos overshoots slightly


def _centre_by_mass(patch: np.ndarray) -> np.ndarray:
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    height, width = patch.shape
    mass = float(patch.sum())
    if mass == 0.0:
        return canvas
    centre_y = float(patch.sum(axis=1) @ np.arange(height)) / mass
    centre_x = float(patch.sum(axis=0) @ np.arange(width)) / mass
    # Clamp so a lopsided digit stays whole rather than exactly centred.
    top = min(max(int(np.floor(_CENTRE - centre_y + 0.5)), 0), SIDE - height)
    left = min(max(int(np.floor(_CENTRE - centre_x + 0.5)), 0), SIDE - width)
    canvas[top : top + height, left : left + width] = patch
    return canvas
