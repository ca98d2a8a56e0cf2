"""KServe v2 REST bodies ⇄ the model core's arrays: JSON tensors and Triton's binary tensor data.

An inference request is JSON, `{"id", "parameters", "inputs": [...], "outputs": [...]}`, whose
input tensor carries its values as `data` (flat or nested, row-major) or, with Triton's binary
tensor data extension, as bytes after the JSON: the header `Inference-Header-Content-Length`
says where the JSON ends, and the input's `parameters.binary_data_size` how many bytes follow.
The answer is JSON too, or JSON followed by the raw probabilities when the caller asked for
binary outputs (`binary_data_output`, or an output's `binary_data`), as tritonclient.http does
by default.

Triton's repository and statistics endpoints take small JSON bodies (parse_repository_request)
and answer the gRPC side's protobuf messages in Triton's JSON (serving.http_api.triton_json).

Pure functions over bytes: the REST layer's own structure is checked here (is it JSON, is
`inputs` a list, is `shape` a list of integers); the tensor itself is checked by the same
serving.inputs.wire functions the gRPC API uses, so there is one copy of those checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from core import contract
from serving.inference.errors import InvalidInput
from serving.inputs.wire import check_kserve_request, decode_kserve_input

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
PLATFORM = "onnxruntime_onnx"

# The wire checks name the gRPC message's fields; over REST the same values travel as these.
_REST_TERMS = (
    ("raw_input_contents and contents", "binary data and 'data'"),
    ("raw_input_contents", "binary data"),
    ("contents.fp32_contents", "'data'"),
    ("contents.uint_contents", "'data'"),
)


@dataclass(frozen=True)
class InferRequest:
    """What the model core needs from a REST inference request, checked."""

    images: np.ndarray  # float32 [N, 28, 28, 1] in [0, 1]
    request_id: str = ""
    binary_output: bool = False  # answer the probabilities as binary data after the JSON
    timeout_s: float | None = None  # Triton's `timeout` parameter (microseconds), in seconds


def parse_infer_request(
    body: bytes, header_length: str | None, max_batch_size: int
) -> InferRequest:
    """A REST inference request body (JSON, or JSON + binary tensor data) to an InferRequest."""
    json_part, binary = _split_body(body, header_length)
    request = _load_object(json_part)
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput(
            'the request has no \'inputs\' list; send {"inputs": [{"name": "images", '
            '"datatype": "UINT8", "shape": [1, 28, 28, 1], "data": [...]}]}'
        )
    outputs = _list_of_objects(request.get("outputs", []), "outputs")
    names = [output.get("name") for output in outputs]
    if not all(isinstance(name, str) for name in names):
        raise InvalidInput(
            "every entry of 'outputs' needs a 'name' string, e.g. {\"name\": \"probabilities\"}"
        )
    check_kserve_request(len(inputs), 0, names)
    tensor = _list_of_objects(inputs, "inputs")[0]
    parameters = _parameters(request, "the request")
    return InferRequest(
        images=_decode_tensor(tensor, binary, max_batch_size),
        request_id=_string(request.get("id", ""), "id"),
        binary_output=_binary_output(parameters, outputs),
        timeout_s=_timeout(parameters),
    )


def infer_response(
    request: InferRequest, model_name: str, model_version: str, probabilities: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers, the probabilities as JSON `data` or as binary data."""
    values = np.ascontiguousarray(
        probabilities, dtype=contract.KSERVE_DTYPES[contract.OUTPUT_DATATYPE]
    )
    output: dict[str, Any] = {
        "name": contract.OUTPUT_NAME,
        "datatype": contract.OUTPUT_DATATYPE,
        "shape": list(values.shape),
    }
    body: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": [output],
    }
    if request.request_id:
        body["id"] = request.request_id
    if request.binary_output:
        raw = values.tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        header = orjson.dumps(body)
        return header + raw, {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}
    output["data"] = values.ravel()
    return dumps(body), {"Content-Type": JSON_TYPE}


def dumps(value: Any) -> bytes:
    """JSON bytes; numpy arrays are written by orjson directly (about 10x faster than tolist())."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def server_metadata(version: str, extensions: list[str]) -> dict[str, Any]:
    return {"name": "mnist-serve", "version": version, "extensions": extensions}


def model_metadata(name: str, version: str, num_classes: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [
            {
                "name": contract.INPUT_NAME,
                "datatype": contract.INPUT_DATATYPE,
                "shape": contract.input_shape(),
            }
        ],
        "outputs": [
            {
                "name": contract.OUTPUT_NAME,
                "datatype": contract.OUTPUT_DATATYPE,
                "shape": contract.output_shape(num_classes),
            }
        ],
    }


@dataclass(frozen=True)
class RepositoryRequest:
    """The body of Triton's repository calls: index's `ready`, load/unload's parameter names."""

    ready: bool = False
    parameters: tuple[str, ...] = ()


def parse_repository_request(body: bytes) -> RepositoryRequest:
    """`{"ready": bool}` (index) or `{"parameters": {...}}` (load, unload); an empty body is `{}`."""
    try:
        request = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as error:
        raise InvalidInput(
            f'the request body is not valid JSON ({error}); send e.g. {{"ready": true}} '
            'or {"parameters": {}}, or nothing'
        ) from error
    if not isinstance(request, dict):
        raise InvalidInput(
            f"the request body is a JSON {type(request).__name__}; send a JSON object or nothing"
        )
    parameters = _parameters(request, "the request")
    return RepositoryRequest(
        ready=_flag(request.get("ready", False), "ready"), parameters=tuple(parameters)
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON header's length in "
            f"bytes, between 0 and the body's {len(body)}"
        )
    return body[:length], body[length:]


def _load_object(text: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(
            f"the request body is not valid JSON ({error}); send a KServe v2 inference "
            "request, with Content-Type application/json"
        ) from error
    if not isinstance(value, dict):
        raise InvalidInput(
            f"the request body is a JSON {type(value).__name__}; send a JSON object "
            "with an 'inputs' list"
        )
    return value


def _list_of_objects(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidInput(f"'{field}' must be a list of JSON objects")
    return value


def _parameters(holder: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' of {where} must be a JSON object")
    return parameters


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"'{field}' must be a string")
    return value


def _decode_tensor(tensor: dict[str, Any], binary: bytes, max_batch_size: int) -> np.ndarray:
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(
            "the input needs 'name' and 'datatype' strings, e.g. \"name\": \"images\", "
            '"datatype": "UINT8"'
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidInput(
            f"input '{name}' has shape {shape!r}; send a list of integers such as [1, 28, 28, 1]"
        )
    raw = _binary_data(tensor, name, binary)
    values = _json_values(tensor.get("data"), name, datatype)
    # The typed values go where the wire checks expect the declared datatype's values.
    fp32, uint = (values, ()) if datatype != "UINT8" else ((), values)
    try:
        return decode_kserve_input(
            name=name,
            datatype=datatype,
            shape=shape,
            raw=raw,
            fp32_contents=fp32,
            uint_contents=uint,
            max_batch_size=max_batch_size,
        )
    except InvalidInput as error:
        raise InvalidInput(_in_rest_terms(str(error))) from error


def _binary_data(tensor: dict[str, Any], name: str, binary: bytes) -> bytes | None:
    size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInput(
                f"the body carries {len(binary)} bytes after the JSON header but input '{name}' "
                "declares no parameters.binary_data_size"
            )
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InvalidInput(
            f"input '{name}' declares binary_data_size {size!r} but {len(binary)} bytes follow "
            f"the JSON header ({HEADER_LENGTH})"
        )
    return binary


def _json_values(data: Any, name: str, datatype: str) -> np.ndarray | tuple[()]:
    """`data`, flat or nested, as one flat numeric array (empty when absent)."""
    if data is None:
        return ()
    try:
        values = np.asarray(data)
    except ValueError as error:  # ragged nesting
        raise InvalidInput(
            f"input '{name}' data is ragged ({error}); nested lists must be regular"
        ) from error
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_:
        raise InvalidInput(
            f"input '{name}' data holds {values.dtype.kind!r}-kind values (strings, booleans, "
            "nulls or objects); send numbers"
        )
    values = values.ravel()
    if (
        datatype == "UINT8"
        and values.dtype.kind == "f"
        and values.size
        and not np.all(values == np.round(values))
    ):
        first = int(np.flatnonzero(values != np.round(values))[0])
        raise InvalidInput(
            f"input '{name}' is UINT8 but its data holds {values[first]:g} at index {first}; "
            "send integers 0..255, or declare FP32 with values in [0, 1]"
        )
    return values


def _binary_output(parameters: dict[str, Any], outputs: list[dict[str, Any]]) -> bool:
    """Triton's rule: an output's own `binary_data` wins, else the request's `binary_data_output`."""
    default = parameters.get("binary_data_output", False)
    for output in outputs:
        return _flag(
            _parameters(output, f"output '{output['name']}'").get("binary_data", default),
            "binary_data",
        )
    return _flag(default, "binary_data_output")


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{field}' must be true or false, not {value!r}")
    return value


def _timeout(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidInput(
            f"parameter 'timeout' is {timeout!r}; send microseconds as a non-negative number"
        )
    return timeout / 1e6 if timeout else None  # 0: no timeout, as in Triton


def _in_rest_terms(message: str) -> str:
    for grpc_term, rest_term in _REST_TERMS:
        message = message.replace(grpc_term, rest_term)
    return message
