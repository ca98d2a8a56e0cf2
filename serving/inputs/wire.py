"""Request fields to model input: float32 arrays [N, 28, 28, 1] in [0, 1], checked on the way.

The wire formats of both APIs: mnist.v1 images (raw_pixels, float_pixels, encoded) and
KServe v2 input tensors (raw_input_contents or typed contents). Every function is pure and
raises InvalidInput, whose message says what was wrong and how to fix it. Nothing here
imports grpc or the KServe stubs (tritonclient registers the same `inference.*` protobuf
symbols, and two files defining them in one process clash); messages are read by duck typing.
Encoded images are framed by serving.inputs.framing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from core.contract import IMAGE_SIDE as SIDE
from core.contract import INPUT_NAME, KSERVE_DTYPES, OUTPUT_NAME, PIXELS, scale_pixels
from serving import tracing
from serving.inference.errors import InvalidInput, quoted, shown_dims
from serving.inputs.framing import check_pixel_budget, decode_encoded_image

if TYPE_CHECKING:
    from serving.generated import mnist_classifier_pb2

_KSERVE_FIELDS = {"FP32": "contents.fp32_contents", "UINT8": "contents.uint_contents"}
_KSERVE_FEATURE_SHAPES = ([SIDE, SIDE, 1], [SIDE, SIDE], [PIXELS])
_COMMON_FEATURES = [SIDE, SIDE, 1]
_MAX_DIMS = max(len(shape) for shape in _KSERVE_FEATURE_SHAPES) + 1


def decode_raw_pixels(data: bytes) -> np.ndarray:
    """784 uint8 pixels, row-major, to a (28, 28, 1) float32 image in [0, 1]."""
    if len(data) != PIXELS:
        raise InvalidInput(
            f"raw_pixels holds {len(data)} bytes; expected 784 (28x28 uint8, row-major)"
        )
    return scale_pixels(np.frombuffer(data, dtype=np.uint8)).reshape(SIDE, SIDE, 1)


def decode_float_pixels(values: Sequence[float]) -> np.ndarray:
    """784 floats in [0, 1], row-major, to a (28, 28, 1) float32 image."""
    if len(values) != PIXELS:
        raise InvalidInput(
            f"float_pixels holds {len(values)} values; expected 784 (28x28 floats in [0, 1], row-major)"
        )
    pixels = np.asarray(values, dtype=np.float32)
    _check_unit_floats(pixels, "float_pixels", lambda i: f"index {i}", "or send them as raw_pixels")
    return pixels.reshape(SIDE, SIDE, 1)


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


def has_encoded(images: Sequence[mnist_classifier_pb2.Image]) -> bool:
    """Whether any image is an encoded file (whose decoding is worth moving off the event loop)."""
    return any(image.WhichOneof("data") == "encoded" for image in images)


def check_classify_request(
    images: Sequence[mnist_classifier_pb2.Image],
    max_batch_size: int,
    max_decoded_pixels: int | None,
) -> None:
    """The cheap checks of a ClassifyRequest, before any pixel is decoded: image count and pixel budget."""
    _check_batch_size(len(images), "the request", max_batch_size)
    if max_decoded_pixels is not None:
        check_pixel_budget(
            [image.encoded for image in images if image.WhichOneof("data") == "encoded"],
            max_decoded_pixels,
        )


def decode_classify_images(
    images: Sequence[mnist_classifier_pb2.Image],
    max_batch_size: int,
    max_decoded_pixels: int | None = None,
) -> np.ndarray:
    """A ClassifyRequest's images to a float32 batch [N, 28, 28, 1].

    `max_decoded_pixels` bounds the pixels of the request's encoded images together, read from
    their headers before any is decoded (None: the caller checked already).
    """
    check_classify_request(images, max_batch_size, max_decoded_pixels)
    raw = [image.raw_pixels for image in images if image.WhichOneof("data") == "raw_pixels"]
    if len(raw) == len(images) and all(len(pixels) == PIXELS for pixels in raw):
        # The common all-raw batch converts in one vectorised step (about 10x faster).
        return scale_pixels(np.frombuffer(b"".join(raw), dtype=np.uint8)).reshape(-1, SIDE, SIDE, 1)
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
    other_contents: Mapping[str, int] | None = None,
) -> np.ndarray:
    """A KServe v2 input tensor to a float32 batch [N, 28, 28, 1].

    `raw` is the tensor's raw_input_contents entry; None or empty means the request
    sent typed contents instead. `other_contents` counts the values in the tensor's other
    typed fields (int_contents, bytes_contents...), by field name; this model reads none of
    them. Plain values, not messages, keep the KServe stubs out. Everything is checked from
    lengths before anything is copied: a shape of millions of dims costs nothing.
    """
    if tracing.on:
        with tracing.stage("decode", datatype=datatype):
            return _decode_kserve_input(
                name,
                datatype,
                shape,
                raw,
                fp32_contents,
                uint_contents,
                max_batch_size,
                other_contents,
            )
    return _decode_kserve_input(
        name, datatype, shape, raw, fp32_contents, uint_contents, max_batch_size, other_contents
    )


def _decode_kserve_input(
    name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes | None,
    fp32_contents: Sequence[float],
    uint_contents: Sequence[int],
    max_batch_size: int,
    other_contents: Mapping[str, int] | None,
) -> np.ndarray:
    if name != INPUT_NAME:
        raise InvalidInput(
            f"the input tensor is named {quoted(name)}; this model's only input is named '{INPUT_NAME}'"
        )
    if datatype not in KSERVE_DTYPES:
        raise InvalidInput(
            f"input '{INPUT_NAME}' has datatype {quoted(datatype)}; "
            "send FP32 (values in [0, 1]) or UINT8 (0..255)"
        )
    count = _kserve_batch_size(shape, max_batch_size)
    flat = _kserve_elements(
        datatype, count, raw, fp32_contents, uint_contents, other_contents or {}
    )
    if datatype == "UINT8":
        return scale_pixels(flat).reshape(count, SIDE, SIDE, 1)
    # A read-only view of the request's bytes where they already are native float32 (no copy: the
    # batcher's concatenation or onnxruntime reads them in place); a converted copy elsewhere.
    pixels = flat if flat.dtype == np.float32 else flat.astype(np.float32)
    _check_unit_floats(pixels, f"input '{INPUT_NAME}'", _batch_position, "or send them as UINT8")
    return pixels.reshape(count, SIDE, SIDE, 1)


def decode_common_kserve_input(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, max_batch_size: int
) -> np.ndarray | None:
    """The common request's tensor in the fewest steps, or None: decode_kserve_input must decide.

    The common request: the model's input, FP32 or UINT8 in raw bytes, shaped [N, 28, 28, 1], N
    within the limit, its values in [0, 1]. What this returns is what decode_kserve_input returns
    for the same tensor; anything else (another shape, typed contents, an error to explain) is
    None, and the full checks answer it: they touch every field of the message, each a cost on
    every call (the server's CPU per call at 32 callers x 1 image fell by about 30 us with this).
    """
    if name != INPUT_NAME or len(shape) != 4 or shape[1:] != _COMMON_FEATURES:
        return None
    count = shape[0]
    dtype = KSERVE_DTYPES.get(datatype)
    if (
        dtype is None
        or not 1 <= count <= max_batch_size
        or len(raw) != count * PIXELS * dtype.itemsize
    ):
        return None
    flat = np.frombuffer(raw, dtype=dtype)
    if datatype == "UINT8":
        return scale_pixels(flat).reshape(count, SIDE, SIDE, 1)
    if flat.dtype != np.float32 or _BITS_MAX(flat.view(np.uint32)) > _ONE_BITS:
        return None  # a big-endian host, or values the exact check must judge (-0.0 is in range)
    return flat.reshape(count, SIDE, SIDE, 1)


def check_kserve_request(
    input_count: int, raw_count: int, requested_outputs: Sequence[str]
) -> None:
    """The parts of a ModelInferRequest around its one tensor: how many inputs, raw entries, outputs."""
    if input_count != 1:
        raise InvalidInput(
            f"the request has {input_count} input tensors; this model takes exactly one, "
            f"'{INPUT_NAME}' (FP32 or UINT8, shape [N, 28, 28, 1])"
        )
    if raw_count and raw_count != input_count:
        raise InvalidInput(
            f"raw_input_contents has {raw_count} entries for "
            f"{input_count} inputs; send one per input"
        )
    if len(requested_outputs) > 1:
        raise InvalidInput(
            f"the request asks for {len(requested_outputs)} outputs; "
            f"this model has one, '{OUTPUT_NAME}'"
        )
    for name in requested_outputs:
        if name != OUTPUT_NAME:
            raise InvalidInput(
                f"unknown output {quoted(name)}; this model's only output is '{OUTPUT_NAME}'"
            )


# A float32's bits read as an unsigned int order the non-negative floats as their values do, and
# every negative (its sign bit set), NaN and infinity reads above 1.0's bits: one max over the bits
# decides the common case. Measured in the server at 32 callers x 1 image from one connection (A/B,
# 6 interleaved rounds of 3 s): with this check left out the server answered 4.5-5.8 % more calls/s
# than with the min and max over the floats it replaces (identical servers differ by up to 6 %).
_ONE_BITS = np.float32(1.0).view(np.uint32)
_BITS_MAX = np.maximum.reduce  # the ufunc itself: ndarray.max() adds a Python frame per call


def _check_unit_floats(
    pixels: np.ndarray, field: str, where: Callable[[int], str], hint: str
) -> None:
    if not pixels.size:
        return
    if pixels.dtype == np.float32 and _BITS_MAX(pixels.view(np.uint32)) <= _ONE_BITS:
        return
    # The exact test, where the bits said no (or could not say): -0.0 is in range (its sign bit is
    # set); NaN propagates into min and max and an infinity is out of range, so only a bad tensor
    # pays for finding the first culprit.
    if pixels.min() >= 0.0 and pixels.max() <= 1.0:
        return
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidInput(
            f"{field} holds {bad.size} non-finite value(s) (NaN or Inf), the first ({pixels[bad[0]]}) at "
            f"{where(int(bad[0]))}; send finite values in [0, 1]"
        )
    first = int(np.flatnonzero((pixels < 0.0) | (pixels > 1.0))[0])
    raise InvalidInput(
        f"{field} holds {exact(pixels[first])} at {where(first)}, outside [0, 1]; "
        f"divide 0..255 pixels by 255 {hint}"
    )


def exact(value: np.floating) -> str:
    """A float32 as its shortest exact decimal: 1.0000001 stays 1.0000001 (`:g` would print 1)."""
    return np.format_float_positional(value, unique=True, trim="-")


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
    # The dims count first: a shape of millions of dims is refused before it is copied or printed.
    dims = [int(d) for d in shape] if len(shape) <= _MAX_DIMS else []
    if not dims or dims[1:] not in _KSERVE_FEATURE_SHAPES:
        raise InvalidInput(
            f"input '{INPUT_NAME}' has shape {shown_dims(shape)}; expected [N, 28, 28, 1] (or [N, 28, 28] or [N, 784])"
        )
    if dims[0] < 1:
        raise InvalidInput(
            f"input '{INPUT_NAME}' has batch size {dims[0]} (shape[0]); send at least one image"
        )
    _check_batch_size(dims[0], f"input '{INPUT_NAME}'", max_batch_size)
    return dims[0]


def _kserve_elements(
    datatype: str,
    count: int,
    raw: bytes | None,
    fp32_contents: Sequence[float],
    uint_contents: Sequence[int],
    other_contents: Mapping[str, int],
) -> np.ndarray:
    """The tensor's flat elements, from raw bytes or typed contents, checked for size."""
    expected = count * PIXELS
    dtype = KSERVE_DTYPES[datatype]
    typed_fields = [
        f"contents.{field}"
        for field, size in (
            ("fp32_contents", len(fp32_contents)),
            ("uint_contents", len(uint_contents)),
            *sorted(other_contents.items()),
        )
        if size
    ]
    if raw:
        # The protocol forbids typed contents beside raw_input_contents, whatever their type.
        if typed_fields:
            raise InvalidInput(
                f"input '{INPUT_NAME}' sets both raw_input_contents and {', '.join(typed_fields)}; "
                "send the pixels in one of them"
            )
        if len(raw) != expected * dtype.itemsize:
            raise InvalidInput(
                f"raw_input_contents for '{INPUT_NAME}' holds {len(raw)} bytes; expected {expected * dtype.itemsize} "
                f"({count} x 784 {datatype} values of {dtype.itemsize} byte(s), little-endian)"
            )
        return np.frombuffer(raw, dtype=dtype)
    field = _KSERVE_FIELDS[datatype]
    typed = fp32_contents if datatype == "FP32" else uint_contents
    wrong = [name for name in typed_fields if name != field]
    if wrong:
        raise InvalidInput(
            f"input '{INPUT_NAME}' is {datatype} but its values are in {', '.join(wrong)}; put them in {field} "
            "or raw_input_contents, or declare the datatype that matches"
        )
    if not len(typed):
        raise InvalidInput(
            f"input '{INPUT_NAME}' carries no data; send the pixels in raw_input_contents or {field}"
        )
    if len(typed) != expected:
        raise InvalidInput(
            f"{field} holds {len(typed)} values; expected {expected} ({count} x 784)"
        )
    if datatype == "FP32":
        return np.asarray(typed, dtype=np.float32)
    values = np.asarray(typed, dtype=np.int64)
    if values.min() < 0 or values.max() > 255:
        first = int(np.flatnonzero((values < 0) | (values > 255))[0])
        raise InvalidInput(
            f"{field} holds {values[first]} at {_batch_position(first)}; UINT8 values must be 0..255"
        )
    return values.astype(np.uint8)
