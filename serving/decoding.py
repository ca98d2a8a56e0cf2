"""Turn request fields into model input: float32 arrays [N, 28, 28, 1] in [0, 1].

Every function is pure and raises InvalidInput, whose message says what was wrong
and how to fix it; the servicers map it to INVALID_ARGUMENT. Nothing here imports
grpc or the KServe stubs (tritonclient registers the same `inference.*` protobuf
symbols, and two files defining them in one process clash).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from serving.generated import mnist_classifier_pb2

SIDE = 28
PIXELS = SIDE * SIDE
KSERVE_INPUT_NAME = "images"
# MNIST scaled every digit so the longer side of its ink box is 20 px, then put the
# ink's centre of mass at pixel (14, 14) of the 28x28 field (measured on the test set).
_INK_BOX = 20
_CENTRE = 14.0
_MAX_ENCODED_SIDE = 4096  # larger files are refused before decoding: decompression bombs
# After stretching the ink to [0, 1], fainter pixels are JPEG ringing or paper texture.
_NOISE_FLOOR = 0.1
# Less spread than this between background and the darkest ink means no digit at all.
_MIN_CONTRAST = 0.1
_ENCODED_FORMATS = ("PNG", "JPEG")
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
_KSERVE_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
_KSERVE_FIELDS = {"FP32": "contents.fp32_contents", "UINT8": "contents.uint_contents"}
_KSERVE_FEATURE_SHAPES = ([SIDE, SIDE, 1], [SIDE, SIDE], [PIXELS])


class InvalidInput(ValueError):
    """A request field that cannot become model input; the message says how to fix it."""


def decode_raw_pixels(data: bytes) -> np.ndarray:
    """784 uint8 pixels, row-major, to a (28, 28, 1) float32 image in [0, 1]."""
    if len(data) != PIXELS:
        raise InvalidInput(f"raw_pixels holds {len(data)} bytes; expected 784 (28x28 uint8, row-major)")
    return _scale_uint8(np.frombuffer(data, dtype=np.uint8)).reshape(SIDE, SIDE, 1)


def decode_float_pixels(values: Sequence[float]) -> np.ndarray:
    """784 floats in [0, 1], row-major, to a (28, 28, 1) float32 image."""
    if len(values) != PIXELS:
        raise InvalidInput(
            f"float_pixels holds {len(values)} values; expected 784 (28x28 floats in [0, 1], row-major)"
        )
    pixels = np.asarray(values, dtype=np.float32)
    _check_unit_floats(pixels, "float_pixels", lambda i: f"index {i}", "or send them as raw_pixels")
    return pixels.reshape(SIDE, SIDE, 1)


def decode_encoded_image(data: bytes) -> np.ndarray:
    """A PNG or JPEG of a digit, any size, to a (28, 28, 1) float32 image framed like MNIST."""
    gray = _read_grayscale(data)
    if _background_is_light(gray):
        gray = 1.0 - gray
    elif gray.shape == (SIDE, SIDE):
        # Already in MNIST's frame: keep its pixels so a PNG of an MNIST digit is that digit.
        return gray.reshape(SIDE, SIDE, 1)
    return _fit_to_mnist_frame(gray).reshape(SIDE, SIDE, 1)


def decode_image(image: mnist_classifier_pb2.Image) -> np.ndarray:
    """One mnist.v1.Image, whichever encoding it uses, to a (28, 28, 1) float32 image."""
    field = image.WhichOneof("data")
    if field == "raw_pixels":
        return decode_raw_pixels(image.raw_pixels)
    if field == "float_pixels":
        return decode_float_pixels(image.float_pixels.values)
    if field == "encoded":
        return decode_encoded_image(image.encoded)
    raise InvalidInput("the image carries no data; set one of raw_pixels, float_pixels or encoded")


def decode_classify_images(images: Sequence[mnist_classifier_pb2.Image], max_batch_size: int) -> np.ndarray:
    """A ClassifyRequest's images to a float32 batch [N, 28, 28, 1]."""
    _check_batch_size(len(images), "the request", max_batch_size)
    raw = [image.raw_pixels for image in images if image.WhichOneof("data") == "raw_pixels"]
    if len(raw) == len(images) and all(len(pixels) == PIXELS for pixels in raw):
        # The common all-raw batch converts in one vectorised step (about 10x faster).
        return _scale_uint8(np.frombuffer(b"".join(raw), dtype=np.uint8)).reshape(-1, SIDE, SIDE, 1)
    batch = np.empty((len(images), SIDE, SIDE, 1), dtype=np.float32)
    for index, image in enumerate(images):
        try:
            batch[index] = decode_image(image)
        except InvalidInput as error:
            raise InvalidInput(f"image {index}: {error}") from error
    return batch


def decode_kserve_input(
    name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes | None,
    fp32_contents: Sequence[float],
    uint_contents: Sequence[int],
    max_batch_size: int,
) -> np.ndarray:
    """A KServe v2 input tensor to a float32 batch [N, 28, 28, 1].

    `raw` is the tensor's raw_input_contents entry; None or empty means the request
    sent typed contents instead. Plain values, not messages, keep the KServe stubs out.
    """
    if name != KSERVE_INPUT_NAME:
        raise InvalidInput(f"the input tensor is named {name!r}; this model's only input is named 'images'")
    if datatype not in _KSERVE_DTYPES:
        raise InvalidInput(f"input 'images' has datatype {datatype!r}; send FP32 (values in [0, 1]) or UINT8 (0..255)")
    count = _kserve_batch_size(shape, max_batch_size)
    flat = _kserve_elements(datatype, count, raw, fp32_contents, uint_contents)
    if datatype == "UINT8":
        return _scale_uint8(flat).reshape(count, SIDE, SIDE, 1)
    pixels = flat.astype(np.float32)  # a writable, native-endian copy of the request's bytes
    _check_unit_floats(pixels, "input 'images'", _batch_position, "or send them as UINT8")
    return pixels.reshape(count, SIDE, SIDE, 1)


def _scale_uint8(pixels: np.ndarray) -> np.ndarray:
    # Divide (not multiply by 1/255) to match training's x / 255 bit for bit.
    scaled = pixels.astype(np.float32)
    scaled /= np.float32(255.0)
    return scaled


def _check_unit_floats(pixels: np.ndarray, field: str, where: Callable[[int], str], hint: str) -> None:
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidInput(
            f"{field} holds {bad.size} non-finite value(s) (NaN or Inf), the first ({pixels[bad[0]]}) at "
            f"{where(int(bad[0]))}; send finite values in [0, 1]"
        )
    if pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
        first = int(np.flatnonzero((pixels < 0.0) | (pixels > 1.0))[0])
        raise InvalidInput(
            f"{field} holds {pixels[first]:g} at {where(first)}, outside [0, 1]; "
            f"divide 0..255 pixels by 255 {hint}"
        )


def _batch_position(flat_index: int) -> str:
    return f"image {flat_index // PIXELS}, pixel {flat_index % PIXELS}"


def _check_batch_size(count: int, holder: str, max_batch_size: int) -> None:
    if count < 1:
        raise InvalidInput(f"{holder} holds no images; send at least one")
    if count > max_batch_size:
        raise InvalidInput(
            f"{holder} holds {count} images; the limit is {max_batch_size} per call: split the request"
        )


def _kserve_batch_size(shape: Sequence[int], max_batch_size: int) -> int:
    dims = [int(d) for d in shape]
    if not dims or dims[1:] not in _KSERVE_FEATURE_SHAPES:
        raise InvalidInput(
            f"input 'images' has shape {dims}; expected [N, 28, 28, 1] (or [N, 28, 28] or [N, 784])"
        )
    if dims[0] < 1:
        raise InvalidInput(f"input 'images' has batch size {dims[0]} (shape[0]); send at least one image")
    _check_batch_size(dims[0], "input 'images'", max_batch_size)
    return dims[0]


def _kserve_elements(
    datatype: str, count: int, raw: bytes | None, fp32_contents: Sequence[float], uint_contents: Sequence[int]
) -> np.ndarray:
    """The tensor's flat elements, from raw bytes or typed contents, checked for size."""
    expected = count * PIXELS
    dtype = _KSERVE_DTYPES[datatype]
    if raw:
        if len(fp32_contents) or len(uint_contents):
            raise InvalidInput(
                "input 'images' sets both raw_input_contents and contents; send the pixels in one of them"
            )
        if len(raw) != expected * dtype.itemsize:
            raise InvalidInput(
                f"raw_input_contents for 'images' holds {len(raw)} bytes; expected {expected * dtype.itemsize} "
                f"({count} x 784 {datatype} values of {dtype.itemsize} byte(s), little-endian)"
            )
        return np.frombuffer(raw, dtype=dtype)
    field = _KSERVE_FIELDS[datatype]
    typed, other = (fp32_contents, uint_contents) if datatype == "FP32" else (uint_contents, fp32_contents)
    if not len(typed):
        if len(other):
            wrong = next(f for d, f in _KSERVE_FIELDS.items() if d != datatype)
            raise InvalidInput(
                f"input 'images' is {datatype} but its values are in {wrong}; put them in {field} "
                "or raw_input_contents, or declare the datatype that matches"
            )
        raise InvalidInput(f"input 'images' carries no data; send the pixels in raw_input_contents or {field}")
    if len(typed) != expected:
        raise InvalidInput(f"{field} holds {len(typed)} values; expected {expected} ({count} x 784)")
    if datatype == "FP32":
        return np.asarray(typed, dtype=np.float32)
    values = np.asarray(typed, dtype=np.int64)
    if values.min() < 0 or values.max() > 255:
        first = int(np.flatnonzero((values < 0) | (values > 255))[0])
        raise InvalidInput(
            f"{field} holds {values[first]} at {_batch_position(first)}; UINT8 values must be 0..255"
        )
    return values.astype(np.uint8)


def _read_grayscale(data: bytes) -> np.ndarray:
    """A PNG or JPEG file to a float32 [H, W] array in [0, 1], transparency laid on white."""
    _check_format(data)
    try:
        with Image.open(io.BytesIO(data), formats=_ENCODED_FORMATS) as image:
            _check_dimensions(image.size)
            image.load()
            return _to_grayscale(image)
    except InvalidInput:
        raise
    # Pillow refuses (or, where warnings are errors, warns about) huge headers before our own check.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInput(
            f"encoded image is too large to decode safely ({error}); the limit is "
            f"{_MAX_ENCODED_SIDE}x{_MAX_ENCODED_SIDE}: downscale it first"
        ) from error
    # Decoders fail on hostile or broken files in many ways (OSError, SyntaxError,
    # zlib.error, struct.error...); all of them mean the client sent a bad file.
    except Exception as error:
        raise InvalidInput(
            f"encoded bytes could not be decoded as {_sniff(data)} ({error}); "
            "send a complete, uncorrupted PNG or JPEG file"
        ) from error


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
        raise InvalidInput(f"encoded holds {kind}; send the decoded file bytes (protobuf bytes need no base64)")
    raise InvalidInput(f"encoded holds a {kind} image; only PNG and JPEG are accepted: re-encode it as PNG")


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
    return _scale_uint8(np.asarray(image.convert("L")))


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
