"""Request decoding of a KServe v2 input tensor: raw and typed contents in every accepted shape and
datatype, and every validation branch with its message."""

from __future__ import annotations

import numpy as np
import pytest

from serving.inference.errors import InvalidInput
from serving.inputs.wire import (
    check_kserve_request,
    decode_common_kserve_input,
    decode_kserve_input,
    decode_raw_pixels,
)
from tests.support.digits import raise_message


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


# Values at the edges of [0, 1] as float32, and the bit patterns around them: the common-request
# path judges them by their bits, the full checks by their values; the two must agree.
EDGE_VALUES = [
    0.0,
    -0.0,
    1.0,
    np.nextafter(np.float32(1.0), np.float32(2.0)),
    np.float32(1e-45),
    -np.float32(1e-45),
    0.5,
    -0.5,
    2.0,
    np.inf,
    -np.inf,
    np.nan,
    -np.float32(np.nan),
]


def full_decode(shape, raw, datatype="FP32", name="images"):
    """decode_kserve_input's answer: the batch, or the message of its InvalidInput."""
    try:
        return decode_kserve_input(name, datatype, shape, raw, [], [], 64)
    except InvalidInput as error:
        return str(error)


@pytest.mark.parametrize("value", EDGE_VALUES)
def test_common_path_agrees_with_the_full_checks_on_edge_values(digits: np.ndarray, value) -> None:
    floats = (digits[:2].astype("<f4") / np.float32(255.0))[..., None]
    floats[1, 3, 4, 0] = value
    raw = floats.tobytes()
    full = full_decode([2, 28, 28, 1], raw)
    common = decode_common_kserve_input("images", "FP32", [2, 28, 28, 1], raw, 64)
    if common is None:  # the full checks decide: an error, or -0.0 (in range, sign bit set)
        assert isinstance(full, str) or value == 0.0
    else:
        assert not isinstance(full, str)
        np.testing.assert_array_equal(common, full)
        assert common.dtype == np.float32 and common.shape == (2, 28, 28, 1)
    # An in-range value always takes the common path, except -0.0 (its sign bit is set).
    in_range = bool(0.0 <= value <= 1.0)
    assert (common is not None) == (in_range and not np.signbit(np.float32(value)))


@pytest.mark.parametrize(
    "shape, nbytes, datatype, name",
    [
        ([1, 784], 3136, "FP32", "images"),  # accepted, but not the common shape
        ([1, 28, 28], 3136, "FP32", "images"),
        ([0, 28, 28, 1], 0, "FP32", "images"),
        ([65, 28, 28, 1], 65 * 3136, "FP32", "images"),
        ([1, 28, 28, 1], 3135, "FP32", "images"),
        ([1, 28, 28, 1], 3136, "INT32", "images"),
        ([1, 28, 28, 1], 3136, "FP32", "input_1"),
        ([1, 28, 28, 1, 1], 3136, "FP32", "images"),
    ],
)
def test_common_path_leaves_everything_else_to_the_full_checks(
    shape, nbytes, datatype, name
) -> None:
    assert decode_common_kserve_input(name, datatype, shape, bytes(nbytes), 64) is None


def test_common_path_decodes_uint8_as_the_full_checks_do(digits: np.ndarray) -> None:
    raw = digits[:3].tobytes()
    common = decode_common_kserve_input("images", "UINT8", [3, 28, 28, 1], raw, 64)
    np.testing.assert_array_equal(common, full_decode([3, 28, 28, 1], raw, "UINT8"))
