"""Request decoding of encoded PNG and JPEG: real MNIST digits drawn, inverted, scaled and framed
like MNIST, and every image that is refused (empty, garbage, other formats, base64, truncated,
oversized, a decompression bomb)."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.inputs.framing import decode_encoded_image
from tests.support.digits import drawn_on_paper, encode, raise_message, scaled, similarity


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
