"""A small KServe v2 REST client: the `--api rest` of mnist-predict and the Locust `rest` user.

It offers the gRPC client's inference interface (serving.client.InferenceClient: infer_kserve,
infer_kserve_answer, wait_until_ready, close, with the same answers), so code written against one
runs over the other.

Python's own http.client over one keep-alive connection, so it needs no extra package and, once
gevent has patched the socket module (as Locust does), it cooperates with gevent. Images go as
UINT8 binary tensor data (Triton's extension, what tritonclient.http sends) or as JSON `data`;
probabilities come back as binary data after the JSON header unless JSON is asked for.
With `tls` it speaks HTTPS (presenting a client certificate where `tls` names one), with `token`
every call carries "Authorization: Bearer <token>": the same ClientTls and token as the gRPC
client (serving.client), for servers run with --tls-cert, --tls-client-ca and --auth-token-file.
With `traceparent` (and `tracestate`) every call carries W3C trace context, as the gRPC client's do.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import contract
from serving import tracing
from serving.client import ClientTls, KServeAnswer

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
    headers: Mapping[
        str, str
    ]  # case-insensitive, as HTTP's names are (a proxy such as Envoy lowercases them)
    body: bytes


def ssl_context(tls: ClientTls) -> ssl.SSLContext:
    """What the client trusts (tls.ca, else the system's CAs) and, for mTLS, the certificate it presents."""
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(Path(tls.cert), Path(tls.key))
    return context


class _HttpsConnection(http.client.HTTPSConnection):
    """HTTPS that checks the certificate against `server_name` rather than the host connected to."""

    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext, server_name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # the TCP connection; no proxy tunnel here
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


class RestClient:
    def __init__(
        self,
        address: str,
        timeout: float = 10.0,
        tls: ClientTls | None = None,
        token: str | None = None,
        traceparent: tracing.TraceHeader = None,
        tracestate: str | None = None,
    ) -> None:
        """`address` is host:port of the server's HTTP port (mnist-serve --http-port, default 8000);
        an https:// prefix, or `tls`, makes it HTTPS."""
        if address.startswith("https://") and tls is None:
            tls = ClientTls()  # the system's CAs
        host, _, port = (
            address.removeprefix("http://").removeprefix("https://").rstrip("/").rpartition(":")
        )
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port for the REST API, not {address!r}")
        self.address = f"{host}:{port}"
        host = host.strip("[]")  # an IPv6 literal: [::1]:8000
        self._connection: http.client.HTTPConnection = (
            http.client.HTTPConnection(host, int(port), timeout=timeout)
            if tls is None
            else _HttpsConnection(
                host, int(port), timeout, ssl_context(tls), tls.server_name or host
            )
        )
        # Sent with every call; servers without --auth-token-file ignore it.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._trace_headers = tracing.outgoing(traceparent, tracestate)

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> RestReply:
        """One call; a dropped keep-alive connection is reopened once (the server may close idle ones)."""
        sent = {**self._auth, **(headers or {})}
        if self._trace_headers is not None:
            sent.update(self._trace_headers())
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, body=body, headers=sent)
                response = self._connection.getresponse()
                return RestReply(response.status, response.headers, response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def is_ready(self) -> bool:
        return self.request("GET", "/v2/health/ready").status == 200

    def wait_until_ready(self, timeout: float) -> None:
        """Block until GET /v2/health/ready answers 200, or raise TimeoutError (as the gRPC client)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                status = self.request("GET", "/v2/health/ready").status
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as error:
                self._connection.close()
                last = f"{type(error).__name__}: {error}"
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        raise TimeoutError(
            f"the server at {self.address} was not ready within {timeout:g}s (last: {last}); "
            "check that it is running, serving REST on that port (--http-port) and that its model loaded"
        )

    # KServe v2 inference under the gRPC client's names and answers (serving.client.InferenceClient).
    def infer_kserve(
        self, images: np.ndarray, model_name: str = "mnist", model_version: str = ""
    ) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, 28, 28] through POST .../infer."""
        return self.infer_kserve_answer(images, model_name, model_version).probabilities

    def infer(
        self,
        images: np.ndarray,
        model_name: str = "mnist",
        model_version: str = "",
        binary: bool = True,
    ) -> np.ndarray:
        """infer_kserve, choosing JSON (`binary=False`) or binary tensor data."""
        return self.infer_kserve_answer(images, model_name, model_version, binary).probabilities

    def infer_answer(
        self,
        images: np.ndarray,
        model_name: str = "mnist",
        model_version: str = "",
        binary: bool = True,
    ) -> tuple[np.ndarray, str, str]:
        """infer_kserve_answer as a tuple: (probabilities, model name, model version)."""
        answer = self.infer_kserve_answer(images, model_name, model_version, binary)
        return answer.probabilities, answer.model_name, answer.model_version

    def infer_kserve_answer(
        self,
        images: np.ndarray,
        model_name: str = "mnist",
        model_version: str = "",
        binary: bool = True,
    ) -> KServeAnswer:
        """The probabilities, and the model name and version that computed them (empty version: the newest)."""
        pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(
            -1, contract.IMAGE_SIDE, contract.IMAGE_SIDE, 1
        )
        tensor = {"name": contract.INPUT_NAME, "datatype": "UINT8", "shape": list(pixels.shape)}
        request = {
            "inputs": [tensor],
            "outputs": [{"name": contract.OUTPUT_NAME, "parameters": {"binary_data": binary}}],
        }
        if binary:
            tensor["parameters"] = {"binary_data_size": pixels.nbytes}
            header = json.dumps(request).encode()
            body, headers = (
                header + pixels.tobytes(),
                {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
            )
        else:
            tensor["data"] = pixels.ravel().tolist()
            body, headers = json.dumps(request).encode(), {"Content-Type": "application/json"}
        path = (
            f"/v2/models/{model_name}"
            + (f"/versions/{model_version}" if model_version else "")
            + "/infer"
        )
        reply = self._checked(self.request("POST", path, body, headers))
        header = _header(reply)
        return KServeAnswer(
            _probabilities(reply),
            str(header.get("model_name", "")),
            str(header.get("model_version", "")),
        )

    def json_call(self, method: str, path: str, body: bytes | None = None):
        """A call answered with JSON (e.g. POST /v2/repository/index): the parsed answer, else RestError."""
        return json.loads(self._checked(self.request(method, path, body)).body)

    def classify_encoded(self, blob: bytes) -> dict:
        """One PNG or JPEG through the page's POST /api/classify: label, probabilities, framed pixels."""
        return json.loads(
            self._checked(
                self.request(
                    "POST", "/api/classify", blob, {"Content-Type": "application/octet-stream"}
                )
            ).body
        )

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
    output = next(
        (o for o in header.get("outputs", []) if o.get("name") == contract.OUTPUT_NAME), None
    )
    if output is None:
        raise ValueError(f"the response has no '{contract.OUTPUT_NAME}' output")
    if "data" in output:
        values = np.asarray(output["data"], dtype=np.float32)
    else:
        values = np.frombuffer(reply.body[int(length) :], dtype="<f4")
    return values.reshape(output["shape"])
