"""A small KServe v2 REST client: the `--api rest` of mnist-predict and the Locust `rest` user.

Python's own http.client over one keep-alive connection, so it needs no extra package and, once
gevent has patched the socket module (as Locust does), it cooperates with gevent. Images go as
UINT8 binary tensor data (Triton's extension, what tritonclient.http sends) or as JSON `data`;
probabilities come back as binary data after the JSON header unless JSON is asked for.
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import numpy as np

from core import contract

HEADER_LENGTH = "Inference-Header-Content-Length"


class RestError(Exception):
    """The server answered with an HTTP error; `status` is the code, the message its `error` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class RestReply:
    status: int
    headers: dict[str, str]
    body: bytes


class RestClient:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        """`address` is host:port of the server's HTTP port (mnist-serve --http-port, default 8000)."""
        host, _, port = address.removeprefix("http://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port for the REST API, not {address!r}")
        self.address = f"{host}:{port}"
        self._connection = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> RestReply:
        """One call; a dropped keep-alive connection is reopened once (the server may close idle ones)."""
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, body=body, headers=headers or {})
                response = self._connection.getresponse()
                return RestReply(response.status, dict(response.getheaders()), response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def is_ready(self) -> bool:
        return self.request("GET", "/v2/health/ready").status == 200

    def infer(self, images: np.ndarray, model_name: str = "mnist", model_version: str = "",
              binary: bool = True) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, 28, 28] through POST .../infer."""
        return self.infer_answer(images, model_name, model_version, binary)[0]

    def infer_answer(self, images: np.ndarray, model_name: str = "mnist", model_version: str = "",
                     binary: bool = True) -> tuple[np.ndarray, str, str]:
        """The probabilities, and the model name and version that computed them (empty version: the newest)."""
        pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, contract.IMAGE_SIDE, contract.IMAGE_SIDE, 1)
        tensor = {"name": contract.INPUT_NAME, "datatype": "UINT8", "shape": list(pixels.shape)}
        request = {"inputs": [tensor], "outputs": [{"name": contract.OUTPUT_NAME,
                                                    "parameters": {"binary_data": binary}}]}
        if binary:
            tensor["parameters"] = {"binary_data_size": pixels.nbytes}
            header = json.dumps(request).encode()
            body, headers = header + pixels.tobytes(), {HEADER_LENGTH: str(len(header)),
                                                        "Content-Type": "application/octet-stream"}
        else:
            tensor["data"] = pixels.ravel().tolist()
            body, headers = json.dumps(request).encode(), {"Content-Type": "application/json"}
        path = f"/v2/models/{model_name}" + (f"/versions/{model_version}" if model_version else "") + "/infer"
        reply = self._checked(self.request("POST", path, body, headers))
        header = _header(reply)
        return _probabilities(reply), str(header.get("model_name", "")), str(header.get("model_version", ""))

    def classify_encoded(self, blob: bytes) -> dict:
        """One PNG or JPEG through the page's POST /api/classify: label, probabilities, framed pixels."""
        return json.loads(self._checked(self.request("POST", "/api/classify", blob,
                                                     {"Content-Type": "application/octet-stream"})).body)

    def _checked(self, reply: RestReply) -> RestReply:
        if reply.status != 200:
            try:
                message = json.loads(reply.body)["error"]
            except (ValueError, KeyError, TypeError):
                message = reply.body[:200].decode(errors="replace")
            raise RestError(reply.status, message)
        return reply


def _header(reply: RestReply) -> dict:
    """An infer response's JSON part (all of it, or the part before the binary data)."""
    length = reply.headers.get(HEADER_LENGTH)
    return json.loads(reply.body if length is None else reply.body[: int(length)])


def _probabilities(reply: RestReply) -> np.ndarray:
    """The `probabilities` output of an infer response, JSON data or binary data after the header."""
    length = reply.headers.get(HEADER_LENGTH)
    header = _header(reply)
    output = next((o for o in header.get("outputs", []) if o.get("name") == contract.OUTPUT_NAME), None)
    if output is None:
        raise ValueError(f"the response has no '{contract.OUTPUT_NAME}' output")
    if "data" in output:
        values = np.asarray(output["data"], dtype=np.float32)
    else:
        values = np.frombuffer(reply.body[int(length):], dtype="<f4")
    return values.reshape(output["shape"])
