"""Request decoding: every validation branch, and real MNIST digits through every path."""

from __future__ import annotations

import base64
import gzip
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.generated import mnist_classifier_pb2 as pb
from serving.inference.errors import InvalidInput
from serving.inputs.framing import decode_encoded_image
from serving.inputs.wire import (
    check_kserve_request,
    decode_classify_images,
    decode_float_pixels,
    decode_image,
    decode_kserve_input,
    decode_raw_pixels,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


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


# --- raw_pixels and float_pixels -------------------------------------------------


def test_raw_pixels_are_uint8_over_255(digits: np.ndarray) -> None:
    for digit in digits:
        image = decode_raw_pixels(digit.tobytes())
        assert image.dtype == np.float32 and image.shape == (28, 28, 1)
        np.testing.assert_array_equal(image, scaled(digit))


def test_raw_pixels_of_wrong_length_say_the_expected_layout() -> None:
    assert raise_message(decode_raw_pixels, bytes(783)) == (
        "raw_pixels holds 783 bytes; expected 784 (28x28 uint8, row-major)"
    )
    assert raise_message(decode_raw_pixels, b"").startswith("raw_pixels holds 0 bytes")


def test_float_pixels_pass_through(digits: np.ndarray) -> None:
    values = (digits[0].astype(np.float32) / 255.0).ravel().tolist()
    np.testing.assert_array_equal(decode_float_pixels(values), scaled(digits[0]))


def test_float_pixels_of_wrong_count() -> None:
    assert raise_message(decode_float_pixels, [0.0] * 10) == (
        "float_pixels holds 10 values; expected 784 (28x28 floats in [0, 1], row-major)"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_float_pixels_reject_non_finite_values(bad: float) -> None:
    values = [0.0] * 784
    values[17] = bad
    assert raise_message(decode_float_pixels, values) == (
        f"float_pixels holds 1 non-finite value(s) (NaN or Inf), the first ({np.float32(bad)}) at index 17; "
        "send finite values in [0, 1]"
    )


@pytest.mark.parametrize("bad", [1.5, -0.25, 255.0])
def test_float_pixels_reject_values_outside_unit_interval(bad: float) -> None:
    values = [0.5] * 784
    values[3] = bad
    assert raise_message(decode_float_pixels, values) == (
        f"float_pixels holds {bad:g} at index 3, outside [0, 1]; "
        "divide 0..255 pixels by 255 or send them as raw_pixels"
    )


# --- encoded PNG / JPEG ------------------------------------------------------------


def test_png_of_an_mnist_digit_decodes_to_its_pixels(digits: np.ndarray) -> None:
    for digit in digits:
        np.testing.assert_array_equal(
            decode_encoded_image(encode(Image.fromarray(digit), "PNG")), scaled(digit)
        )
    rgb = Image.fromarray(digits[0]).convert("RGB")
    np.testing.assert_array_equal(decode_encoded_image(encode(rgb, "PNG")), scaled(digits[0]))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_digit_drawn_large_on_paper_decodes_close_to_mnist(digits: np.ndarray, fmt: str) -> None:
    for index, digit in enumerate(digits[:10]):
        decoded = decode_encoded_image(encode(drawn_on_paper(digit, (0, 20 + index)), fmt))
        correlation, mean_error = similarity(decoded, digit)
        assert correlation > 0.8 and mean_error < 0.1, (index, correlation, mean_error)


def test_light_digit_on_dark_large_canvas_is_not_inverted(digits: np.ndarray) -> None:
    canvas = Image.new("L", (90, 90), 0)
    canvas.paste(Image.fromarray(digits[1]).resize((84, 84), Image.Resampling.NEAREST), (3, 2))
    correlation, _ = similarity(decode_encoded_image(encode(canvas, "PNG")), digits[1])
    assert correlation > 0.8


def test_rgba_ink_on_transparent_background_is_laid_on_white(digits: np.ndarray) -> None:
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = digits[2]  # black ink whose opacity is the stroke
    correlation, mean_error = similarity(
        decode_encoded_image(encode(Image.fromarray(rgba), "PNG")), digits[2]
    )
    assert correlation > 0.95 and mean_error < 0.05


def test_palette_png(digits: np.ndarray) -> None:
    palette = Image.new("P", (28, 28))
    palette.putpalette([level for level in range(256) for _ in range(3)])
    palette.putdata(digits[3].ravel().tolist())
    np.testing.assert_array_equal(decode_encoded_image(encode(palette, "PNG")), scaled(digits[3]))
    # Black ink on a transparent background: laid on white paper, then read inverted.
    palette.putdata((255 - digits[3]).ravel().tolist())
    correlation, _ = similarity(
        decode_encoded_image(encode(palette, "PNG", transparency=255)), digits[3]
    )
    assert correlation > 0.95


def test_sixteen_bit_grayscale_png(digits: np.ndarray) -> None:
    deep = Image.fromarray(digits[4].astype(np.uint16) * 257)
    np.testing.assert_allclose(
        decode_encoded_image(encode(deep, "PNG")), scaled(digits[4]), atol=1e-6
    )


def test_off_centre_small_digit_is_scaled_to_20_px_and_centred_by_mass() -> None:
    sheet = np.full((200, 300), 255, dtype=np.uint8)
    sheet[10:40, 250:260] = 0  # a "1" stroke, 30 px tall, in the top-right corner
    decoded = decode_encoded_image(encode(Image.fromarray(sheet), "PNG"))[..., 0]
    rows = np.flatnonzero(decoded.any(axis=1))
    assert rows[-1] - rows[0] + 1 == 20
    mass = decoded.sum()
    centre = (
        decoded.sum(axis=1) @ np.arange(28) / mass,
        decoded.sum(axis=0) @ np.arange(28) / mass,
    )
    assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5


@pytest.mark.parametrize(
    ("size", "level"), [((100, 60), 255), ((100, 60), 0), ((28, 28), 255), ((40, 40), 128)]
)
def test_blank_image_decodes_to_zeros(size: tuple[int, int], level: int) -> None:
    decoded = decode_encoded_image(encode(Image.new("L", size, level), "PNG"))
    assert decoded.shape == (28, 28, 1) and not decoded.any()


def test_empty_encoded() -> None:
    assert raise_message(decode_encoded_image, b"") == (
        "encoded holds no bytes; send the contents of a PNG or JPEG file"
    )


def test_garbage_bytes_are_not_an_image() -> None:
    assert raise_message(decode_encoded_image, b"garbage!!") == (
        "encoded is not a PNG or JPEG file (it starts with 67 61 72 62 61 67 65 21); "
        "send the file's bytes, or raw_pixels for 28x28 uint8 pixels"
    )


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt: str) -> None:
    data = encode(Image.new("L", (28, 28)), fmt)
    assert raise_message(decode_encoded_image, data) == (
        f"encoded holds a {fmt} image; only PNG and JPEG are accepted: re-encode it as PNG"
    )


def test_base64_text_is_refused_with_a_hint(digits: np.ndarray) -> None:
    text = base64.b64encode(encode(Image.fromarray(digits[0]), "PNG"))
    assert raise_message(decode_encoded_image, text) == (
        "encoded holds base64 text of a PNG; send the decoded file bytes (protobuf bytes need no base64)"
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_undecodable(digits: np.ndarray, fmt: str) -> None:
    data = encode(drawn_on_paper(digits[0]), fmt)
    message = raise_message(decode_encoded_image, data[: len(data) // 2])
    assert message.startswith(f"encoded bytes could not be decoded as {fmt} (")
    assert message.endswith("); send a complete, uncorrupted PNG or JPEG file")


def test_oversized_image_is_refused_before_decoding() -> None:
    assert raise_message(decode_encoded_image, encode(Image.new("L", (4097, 8)), "PNG")) == (
        "encoded image is 4097x8 pixels; the limit is 4096x4096: downscale it first"
    )


def test_decompression_bomb_header_is_refused() -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 pixels, 8-bit gray
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    message = raise_message(decode_encoded_image, bomb)
    assert message.startswith(
        ("encoded image is too large to decode safely", "encoded image is 100000x100000")
    )


# --- mnist.v1.Image dispatch and ClassifyRequest batches -----------------------------


def test_decode_image_dispatches_on_the_oneof(digits: np.ndarray) -> None:
    expected = scaled(digits[5])
    values = (digits[5].astype(np.float32) / 255.0).ravel().tolist()
    for image in (
        pb.Image(raw_pixels=digits[5].tobytes()),
        pb.Image(float_pixels=pb.FloatPixels(values=values)),
        pb.Image(encoded=encode(Image.fromarray(digits[5]), "PNG")),
    ):
        np.testing.assert_array_equal(decode_image(image), expected)
    assert raise_message(decode_image, pb.Image()) == (
        "the image carries no data; set one of raw_pixels, float_pixels or encoded"
    )


def test_classify_batch_of_mixed_encodings(digits: np.ndarray) -> None:
    images = [
        pb.Image(raw_pixels=digits[0].tobytes()),
        pb.Image(
            float_pixels=pb.FloatPixels(
                values=(digits[1].astype(np.float32) / 255.0).ravel().tolist()
            )
        ),
        pb.Image(encoded=encode(Image.fromarray(digits[2]), "PNG")),
    ]
    batch = decode_classify_images(images, max_batch_size=64)
    assert batch.dtype == np.float32 and batch.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(batch, scaled(digits[:3]))


def test_classify_batch_of_raw_images_matches_one_by_one(digits: np.ndarray) -> None:
    request = pb.ClassifyRequest(images=[pb.Image(raw_pixels=digit.tobytes()) for digit in digits])
    batch = decode_classify_images(request.images, max_batch_size=64)
    np.testing.assert_array_equal(batch, digits[..., None].astype(np.float32) / 255.0)


def test_classify_batch_errors_name_the_image() -> None:
    images = [
        pb.Image(raw_pixels=bytes(784)),
        pb.Image(raw_pixels=bytes(784)),
        pb.Image(raw_pixels=bytes(783)),
    ]
    assert raise_message(decode_classify_images, images, 64) == (
        "image 2: raw_pixels holds 783 bytes; expected 784 (28x28 uint8, row-major)"
    )
    assert raise_message(
        decode_classify_images, [pb.Image(raw_pixels=bytes(784)), pb.Image()], 64
    ) == ("image 1: the image carries no data; set one of raw_pixels, float_pixels or encoded")


def test_classify_batch_size_limits() -> None:
    assert (
        raise_message(decode_classify_images, [], 64)
        == "the request holds no images; send at least one"
    )
    images = [pb.Image(raw_pixels=bytes(784))] * 70
    assert raise_message(decode_classify_images, images, 64) == (
        "the request holds 70 images; the limit is 64 per call: split the request"
    )


# --- KServe v2 input tensor --------------------------------------------------------


def kserve(
    shape, raw=None, fp32=(), uint=(), *, name="images", datatype="FP32", limit=64
) -> np.ndarray:
    return decode_kserve_input(name, datatype, shape, raw, list(fp32), list(uint), limit)


def kserve_error(*args, **kwargs) -> str:
    with pytest.raises(InvalidInput) as caught:
        kserve(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("feature_shape", [[28, 28, 1], [28, 28], [784]])
def test_kserve_fp32_raw_in_any_accepted_shape(
    digits: np.ndarray, feature_shape: list[int]
) -> None:
    floats = digits[:4].astype("<f4") / np.float32(255.0)
    batch = kserve([4, *feature_shape], raw=floats.tobytes())
    assert batch.dtype == np.float32 and batch.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(batch, floats[..., None])


def test_kserve_uint8_raw_is_scaled_like_raw_pixels(digits: np.ndarray) -> None:
    batch = kserve([4, 28, 28, 1], raw=digits[:4].tobytes(), datatype="UINT8")
    np.testing.assert_array_equal(
        batch, np.stack([decode_raw_pixels(d.tobytes()) for d in digits[:4]])
    )


def test_kserve_typed_contents(digits: np.ndarray) -> None:
    floats = digits[:2].astype(np.float32) / 255.0
    np.testing.assert_array_equal(kserve([2, 784], fp32=floats.ravel().tolist()), floats[..., None])
    uint = kserve([2, 28, 28], uint=digits[:2].ravel().tolist(), datatype="UINT8")
    np.testing.assert_array_equal(uint, floats[..., None])


def test_kserve_wrong_name_and_datatype() -> None:
    assert kserve_error([1, 784], raw=bytes(3136), name="input_1") == (
        "the input tensor is named 'input_1'; this model's only input is named 'images'"
    )
    assert kserve_error([1, 784], raw=bytes(3136), datatype="INT32") == (
        "input 'images' has datatype 'INT32'; send FP32 (values in [0, 1]) or UINT8 (0..255)"
    )


@pytest.mark.parametrize("shape", [[1, 28, 28, 3], [1, 28, 27], [784], [], [1, 1, 28, 28]])
def test_kserve_wrong_shape(shape: list[int]) -> None:
    assert kserve_error(shape, raw=bytes(3136)) == (
        f"input 'images' has shape {shape}; expected [N, 28, 28, 1] (or [N, 28, 28] or [N, 784])"
    )


def test_kserve_batch_size_limits() -> None:
    assert kserve_error([0, 28, 28, 1], raw=b"") == (
        "input 'images' has batch size 0 (shape[0]); send at least one image"
    )
    assert kserve_error([-1, 28, 28, 1], raw=bytes(3136)) == (
        "input 'images' has batch size -1 (shape[0]); send at least one image"
    )
    assert kserve_error([70, 784], raw=bytes(70 * 784), datatype="UINT8") == (
        "input 'images' holds 70 images; the limit is 64 per call: split the request"
    )


def test_kserve_raw_of_wrong_length() -> None:
    assert kserve_error([1, 28, 28, 1], raw=bytes(3135)) == (
        "raw_input_contents for 'images' holds 3135 bytes; expected 3136 (1 x 784 FP32 values of 4 byte(s), "
        "little-endian)"
    )
    assert kserve_error([2, 784], raw=bytes(784), datatype="UINT8") == (
        "raw_input_contents for 'images' holds 784 bytes; expected 1568 (2 x 784 UINT8 values of 1 byte(s), "
        "little-endian)"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_kserve_fp32_non_finite_values_are_located(bad: float) -> None:
    floats = np.zeros((2, 784), dtype="<f4")
    floats[1, 5] = bad
    assert kserve_error([2, 784], raw=floats.tobytes()) == (
        f"input 'images' holds 1 non-finite value(s) (NaN or Inf), the first ({np.float32(bad)}) at "
        "image 1, pixel 5; send finite values in [0, 1]"
    )


def test_kserve_fp32_values_outside_unit_interval() -> None:
    assert kserve_error([1, 784], fp32=[2.0] + [0.0] * 783) == (
        "input 'images' holds 2 at image 0, pixel 0, outside [0, 1]; "
        "divide 0..255 pixels by 255 or send them as UINT8"
    )


def test_kserve_missing_or_misplaced_data() -> None:
    assert kserve_error([1, 784]) == (
        "input 'images' carries no data; send the pixels in raw_input_contents or contents.fp32_contents"
    )
    assert kserve_error([1, 784], raw=b"", datatype="UINT8") == (
        "input 'images' carries no data; send the pixels in raw_input_contents or contents.uint_contents"
    )
    assert kserve_error([1, 784], uint=[0] * 784) == (
        "input 'images' is FP32 but its values are in contents.uint_contents; put them in "
        "contents.fp32_contents or raw_input_contents, or declare the datatype that matches"
    )
    assert kserve_error([1, 784], raw=bytes(3136), fp32=[0.0] * 784) == (
        "input 'images' sets both raw_input_contents and contents.fp32_contents; send the pixels in one of them"
    )


def test_kserve_typed_contents_of_wrong_count_or_range() -> None:
    assert kserve_error([1, 784], uint=[0] * 10, datatype="UINT8") == (
        "contents.uint_contents holds 10 values; expected 784 (1 x 784)"
    )
    assert kserve_error([1, 784], fp32=[0.0] * 785) == (
        "contents.fp32_contents holds 785 values; expected 784 (1 x 784)"
    )
    values = [0] * 784
    values[5] = 300
    assert kserve_error([1, 784], uint=values, datatype="UINT8") == (
        "contents.uint_contents holds 300 at image 0, pixel 5; UINT8 values must be 0..255"
    )


def test_kserve_request_structure() -> None:
    assert raise_message(check_kserve_request, 2, 0, []).startswith(
        "the request has 2 input tensors"
    )
    assert raise_message(check_kserve_request, 1, 2, []).startswith(
        "raw_input_contents has 2 entries for 1 inputs"
    )
    assert raise_message(check_kserve_request, 1, 1, ["logits"]) == (
        "unknown output 'logits'; this model's only output is 'probabilities'"
    )
    check_kserve_request(1, 1, ["probabilities"])
    check_kserve_request(1, 0, [])


def test_inputs_and_model_core_import_neither_grpc_nor_kserve_stubs() -> None:
    probe = (
        "import sys, serving.inputs.wire, serving.inputs.framing, serving.inference.served_model; "
        "from google.protobuf import descriptor_pool; "
        "assert 'grpc' not in sys.modules, 'grpc imported'; "
        "pool = descriptor_pool.Default(); "
        'exec(\'try:\\n pool.FindMessageTypeByName("inference.ModelInferRequest")\\n'
        'except KeyError:\\n pass\\nelse:\\n raise AssertionError("KServe stubs registered")\')'
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, check=True, timeout=60)
