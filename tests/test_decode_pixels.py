"""Request decoding of pixels: raw_pixels and float_pixels with every validation branch, the
mnist.v1.Image oneof and ClassifyRequest batches; and what the decoding core imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serving.generated import mnist_classifier_pb2 as pb
from serving.inputs.wire import (
    decode_classify_images,
    decode_float_pixels,
    decode_image,
    decode_raw_pixels,
)
from tests.support.common import ROOT
from tests.support.digits import encode, raise_message, scaled


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


def test_inputs_and_model_core_import_neither_grpc_nor_kserve_stubs() -> None:
    probe = (
        "import sys, serving.inputs.wire, serving.inputs.framing, serving.inference.served_model; "
        "from google.protobuf import descriptor_pool; "
        "assert 'grpc' not in sys.modules, 'grpc imported'; "
        "pool = descriptor_pool.Default(); "
        'exec(\'try:\\n pool.FindMessageTypeByName("inference.ModelInferRequest")\\n'
        'except KeyError:\\n pass\\nelse:\\n raise AssertionError("KServe stubs registered")\')'
    )
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, timeout=60)
