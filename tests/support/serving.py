"""Fixtures and helpers of the tests that call a real server: the reference model, clients, metrics.

Registered as a plugin in tests/conftest.py, so its fixtures serve every test module."""

from __future__ import annotations

import io
import re
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.repository import load_version
from serving.client import ClassifierClient
from serving.process import free_port, serve_command
from serving.rest_client import RestClient
from tests.support.common import ROOT


@pytest.fixture(scope="module")
def reference(trained_repository):
    """In-process onnxruntime on the same model file: what the server must answer."""
    session = ort.InferenceSession(
        str(load_version(trained_repository, "mnist").model_path),
        providers=["CPUExecutionProvider"],
    )
    return lambda images: session.run(
        None, {"images": (images.astype(np.float32) / 255)[..., None]}
    )[0]


@pytest.fixture()
def client(server):
    with ClassifierClient(server.target, timeout=20) as c:
        yield c


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def metric(server, name: str, default: float | None = None, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`, read from /metrics.

    A series that is not there fails the test (a misspelt name cannot read as 0), unless a default
    is given for a labelled child that the server creates on first use.
    """
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    values = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            values.append(float(match.group(2)))
    if not values and default is None:
        raise AssertionError(f"no sample of {name} {labels or ''} in /metrics")
    return sum(values) if values else default


def served_provider(server) -> str:
    """The execution provider the server itself logged at start (--device auto decides it)."""
    found = re.findall(r"onnxruntime \S+ on (\w+ExecutionProvider)", server.log())
    assert found, server.log()[-2000:]
    return found[-1]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def triton_http(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


@pytest.fixture()
def rest(server):
    with RestClient(f"127.0.0.1:{server.http_port}", timeout=20) as client:
        yield client


def triton_infer(triton, batch: np.ndarray, datatype: str, model: str = "mnist", version: str = ""):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return triton.infer(
        model,
        [tensor],
        model_version=version,
        outputs=[grpcclient.InferRequestedOutput("probabilities")],
    )


def serve_and_fail(
    *args: str, port: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`mnist-serve` with `args` (they name --model-repository), expected to stop at start-up."""
    return subprocess.run(
        serve_command(None, *args, port=port or free_port()),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False
