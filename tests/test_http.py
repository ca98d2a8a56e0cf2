"""KServe v2 over HTTP/REST on the real server process: tritonclient.http, curl, bad input, draining."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.repository import load_version
from serving.client import ClassifierClient, InferenceClient, KServeAnswer
from serving.process import free_port, serve_command, start_server
from serving.rest_client import RestClient, RestError
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


def test_both_clients_offer_one_inference_interface(server, mnist_test_set, reference):
    """The same code over gRPC and REST: the same method names, arguments and answers."""
    images = mnist_test_set[0][:4]
    clients = [
        ClassifierClient(server.target, timeout=20),
        RestClient(f"127.0.0.1:{server.http_port}", timeout=20),
    ]
    for client in clients:
        with client:
            assert isinstance(client, InferenceClient), type(client)
            client.wait_until_ready(30)
            answer = client.infer_kserve_answer(images, "mnist", "1")
            assert isinstance(answer, KServeAnswer) and (
                answer.model_name,
                answer.model_version,
            ) == ("mnist", "1")
            np.testing.assert_allclose(answer.probabilities, reference(images), atol=1e-5)
            np.testing.assert_allclose(client.infer_kserve(images), reference(images), atol=1e-5)


def test_tritonclient_http_health_and_metadata(triton_http, trained_repository):
    version = str(load_version(trained_repository, "mnist").version)
    assert triton_http.is_server_live() and triton_http.is_server_ready()
    assert triton_http.is_model_ready("mnist") and triton_http.is_model_ready("mnist", version)
    assert not triton_http.is_model_ready("resnet") and not triton_http.is_model_ready(
        "mnist", "99"
    )
    assert triton_http.get_server_metadata() == {
        "name": "mnist-serve",
        "version": "0.1.0",
        "extensions": [
            "model_repository",
            "model_configuration",
            "statistics",
            "binary_tensor_data",
        ],
    }
    for metadata in (
        triton_http.get_model_metadata("mnist"),
        triton_http.get_model_metadata("mnist", version),
    ):
        assert metadata["name"] == "mnist" and metadata["versions"] == [version]
        assert metadata["inputs"] == [
            {"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}
        ]
        assert metadata["outputs"] == [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
        ]


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize(
    "binary_output", [True, False, None], ids=["binary-out", "json-out", "default-out"]
)
def test_tritonclient_http_infer_equals_onnxruntime(
    triton_http, mnist_test_set, reference, datatype, binary_input, binary_output
):
    import tritonclient.http as httpclient

    images = mnist_test_set[0][:16]
    batch = (
        images[..., None] if datatype == "UINT8" else (images.astype(np.float32) / 255)[..., None]
    )
    tensor = httpclient.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch, binary_data=binary_input)
    # None: no outputs named, so tritonclient asks for every output as binary (binary_data_output).
    outputs = (
        None
        if binary_output is None
        else [httpclient.InferRequestedOutput("probabilities", binary_output)]
    )
    result = triton_http.infer("mnist", [tensor], outputs=outputs, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(images), atol=1e-5)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "mnist"
    assert ("data" in response["outputs"][0]) == (binary_output is False)


def test_nested_json_data_and_a_versioned_path(
    rest, server, trained_repository, mnist_test_set, reference
):
    version = load_version(trained_repository, "mnist").version
    images = mnist_test_set[0][:3]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [3, 28, 28, 1],
                    "data": images[..., None].tolist(),
                }
            ]
        }
    ).encode()  # nested lists
    reply = rest.request(
        "POST",
        f"/v2/models/mnist/versions/{version}/infer",
        body,
        {"Content-Type": "application/json"},
    )
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["model_version"] == str(version) and answer["outputs"][0]["shape"] == [3, 10]
    np.testing.assert_allclose(
        np.reshape(answer["outputs"][0]["data"], (3, 10)), reference(images), atol=1e-5
    )


def test_curl_with_a_json_body(server, mnist_test_set, reference, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is missing in CI (Debian package curl)")
        pytest.skip("curl is not installed (Debian package curl)")
    images = mnist_test_set[0][:2]
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [2, 784],
                        "data": images.ravel().tolist(),
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{request}",
            f"http://127.0.0.1:{server.http_port}/v2/models/mnist/infer",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [2, 10]
    np.testing.assert_allclose(np.reshape(output["data"], (2, 10)), reference(images), atol=1e-5)


# --- every bad input of the gRPC tests, over REST: its HTTP code and a message, then a good call -----


def _tensor(datatype="UINT8", shape=(1, 28, 28, 1), data=None, **extra):
    values = [0] * int(np.prod(shape)) if data is None else data
    return {"name": "images", "datatype": datatype, "shape": list(shape), "data": values, **extra}


def _json(request) -> tuple[bytes, dict[str, str]]:
    return json.dumps(request).encode(), {"Content-Type": "application/json"}


def _binary(request, raw: bytes, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(request).encode()
    length = len(header) if header_length is None else header_length
    return header + raw, {
        "Inference-Header-Content-Length": str(length),
        "Content-Type": "application/octet-stream",
    }


NAN_JSON = (
    b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784], "data": [NaN'
    + b", 0" * 783
    + b"]}]}"
)
BAD_REST = [
    # (case, path, (body, headers), HTTP code, part of the message)
    ("wrong shape", "mnist", _json({"inputs": [_tensor("FP32", (1, 27, 28, 1))]}), 400, "shape"),
    ("wrong datatype", "mnist", _json({"inputs": [_tensor("INT32")]}), 400, "INT32"),
    (
        "wrong binary length",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32", data=[]), "parameters": {"binary_data_size": 4 * 784 - 1}}
                ]
            },
            bytes(4 * 784 - 1),
        ),
        400,
        "3135 bytes",
    ),
    (
        "wrong data count",
        "mnist",
        _json({"inputs": [_tensor(data=[1, 2, 3])]}),
        400,
        "holds 3 values; expected 784",
    ),
    (
        "NaN in JSON",
        "mnist",
        (NAN_JSON, {"Content-Type": "application/json"}),
        400,
        "not valid JSON",
    ),  # no NaN in JSON
    (
        "NaN binary",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32"), "data": None, "parameters": {"binary_data_size": 4 * 784}}
                ]
            },
            np.full(784, np.nan, "<f4").tobytes(),
        ),
        400,
        "NaN",
    ),
    (
        "Inf binary",
        "mnist",
        _binary(
            {
                "inputs": [
                    {**_tensor("FP32"), "data": None, "parameters": {"binary_data_size": 4 * 784}}
                ]
            },
            np.full(784, np.inf, "<f4").tobytes(),
        ),
        400,
        "Inf",
    ),
    (
        "out of range",
        "mnist",
        _json({"inputs": [_tensor("FP32", data=[255.0] * 784)]}),
        400,
        "[0, 1]",
    ),
    ("UINT8 over 255", "mnist", _json({"inputs": [_tensor(data=[256] * 784)]}), 400, "0..255"),
    (
        "UINT8 fractions",
        "mnist",
        _json({"inputs": [_tensor(data=[0.5] * 784)]}),
        400,
        "integers 0..255",
    ),
    (
        "empty batch",
        "mnist",
        _json({"inputs": [_tensor("FP32", (0, 28, 28, 1))]}),
        400,
        "at least one",
    ),
    (
        "over the limit",
        "mnist",
        _json({"inputs": [_tensor(shape=(65, 28, 28, 1))]}),
        400,
        "the limit is 64",
    ),
    (
        "unknown output",
        "mnist",
        _json({"inputs": [_tensor()], "outputs": [{"name": "logits"}]}),
        400,
        "unknown output 'logits'",
    ),
    ("two inputs", "mnist", _json({"inputs": [_tensor(), _tensor()]}), 400, "exactly one"),
    ("no inputs", "mnist", _json({"id": "x"}), 400, "'inputs'"),
    (
        "not JSON",
        "mnist",
        (b"images=1", {"Content-Type": "application/x-www-form-urlencoded"}),
        400,
        "not valid JSON",
    ),
    (
        "ragged data",
        "mnist",
        _json({"inputs": [_tensor(shape=(1, 784), data=[[1, 2], [3]])]}),
        400,
        "ragged",
    ),
    ("strings", "mnist", _json({"inputs": [_tensor(data=["0"] * 784)]}), 400, "send numbers"),
    (
        "shape of strings",
        "mnist",
        _json({"inputs": [_tensor(shape=("1", "784"), data=[0] * 784)]}),
        400,
        "list of integers",
    ),
    (
        "bad header length",
        "mnist",
        _binary({"inputs": [_tensor()]}, b"", header_length=10**6),
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "undeclared binary",
        "mnist",
        _binary({"inputs": [_tensor()]}, bytes(10)),
        400,
        "binary_data_size",
    ),
    (
        "binary and data",
        "mnist",
        _binary({"inputs": [{**_tensor(), "parameters": {"binary_data_size": 784}}]}, bytes(784)),
        400,
        "binary data and 'data'",
    ),
    (
        "bad timeout",
        "mnist",
        _json({"inputs": [_tensor()], "parameters": {"timeout": "soon"}}),
        400,
        "timeout",
    ),
    ("unknown model", "resnet", _json({"inputs": [_tensor()]}), 404, "unknown model 'resnet'"),
    ("unknown version", "mnist/versions/9", _json({"inputs": [_tensor()]}), 404, "version '9'"),
]


@pytest.mark.parametrize(
    "case,model,request_body,status,message", BAD_REST, ids=[c[0] for c in BAD_REST]
)
def test_bad_rest_requests(
    rest, mnist_test_set, reference, case, model, request_body, status, message
):
    body, headers = request_body
    reply = rest.request("POST", f"/v2/models/{model}/infer", body, headers)
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    error = json.loads(reply.body)["error"]
    assert message in error, error
    images = mnist_test_set[0][
        :2
    ]  # and the next good call, on the same connection, is answered right
    np.testing.assert_allclose(rest.infer(images), reference(images), atol=1e-5)


@pytest.mark.parametrize(
    "method,path,status,message",
    [
        ("GET", "/v2/models/mnist/infer", 405, "not allowed"),
        ("GET", "/v3/anything", 404, "not an endpoint"),
        ("GET", "/v2/models/resnet", 404, "unknown model 'resnet'"),
    ],
)
def test_wrong_paths_and_methods_answer_json_errors(rest, method, path, status, message):
    reply = rest.request(method, path)
    assert reply.status == status and message in json.loads(reply.body)["error"]


def test_a_body_over_the_size_limit_is_refused(rest, mnist_test_set, reference):
    reply = rest.request(
        "POST",
        "/v2/models/mnist/infer",
        b"{" + b" " * (17 * 1024 * 1024) + b"}",
        {"Content-Type": "application/json"},
    )
    assert reply.status == 413 and "--max-message-bytes" in json.loads(reply.body)["error"]
    with RestClient(
        rest.address
    ) as fresh:  # the server may close that connection; a new one is served
        np.testing.assert_allclose(
            fresh.infer(mnist_test_set[0][:1]), reference(mnist_test_set[0][:1]), atol=1e-5
        )


# --- the page's own endpoints ------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_endpoint_frames_a_drawing_and_returns_what_the_model_saw(
    rest, mnist_test_set, reference
):
    images, labels = mnist_test_set
    index = next(i for i in range(100) if reference(images[i : i + 1]).argmax() == labels[i])
    # Dark ink on white paper, 10x the size, off-centre: what a person might upload.
    paper = np.full((400, 400), 255, np.uint8)
    paper[40:320, 100:380] = 255 - np.kron(images[index], np.ones((10, 10), np.uint8))
    reply = rest.request("POST", "/api/classify", _png(paper), {"Content-Type": "image/png"})
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["label"] == labels[index] and answer["class_name"] == str(labels[index])
    framed = np.array(answer["framed"], np.uint8).reshape(28, 28)
    # Cropped, scaled and centred back into MNIST's frame: nearly the digit the drawing was made from.
    assert np.corrcoef(framed.ravel(), images[index].ravel())[0, 1] > 0.9
    assert abs(float(np.sum(answer["probabilities"])) - 1.0) < 1e-4
    refused = rest.request("POST", "/api/classify", b"GIF89a....", {"Content-Type": "image/gif"})
    assert refused.status == 400 and "only PNG and JPEG" in json.loads(refused.body)["error"]


def test_the_page_and_its_files_are_served_from_the_package(server, rest):
    page = rest.request("GET", "/")
    assert page.status == 200 and b'<canvas id="pad"' in page.body
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for name in ("page.js", "page.css", "digits.png", "digits.json"):
        assert rest.request("GET", f"/static/{name}").status == 200, name
    described = json.loads(rest.request("GET", "/api/model").body)
    assert described["model_name"] == "mnist" and described["execution_provider"].endswith(
        "ExecutionProvider"
    )
    assert described["class_names"] == [str(d) for d in range(10)]


def test_the_shipped_sample_is_the_first_100_mnist_test_digits(mnist_test_set):
    from serving.http_api.page import STATIC
    from serving.http_api.sample_digits import unsprite

    images, labels = mnist_test_set
    sheet = np.asarray(Image.open(STATIC / "digits.png"))
    assert np.array_equal(unsprite(sheet), images[:100])
    assert json.loads((STATIC / "digits.json").read_text())["labels"] == labels[:100].tolist()


# --- operations: metrics, draining, ports, the CLI --------------------------------------------


def test_metrics_count_http_calls(server, rest, mnist_test_set):
    def count(code: str) -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        prefix = f'mnist_requests_total{{code="{code}",method="POST /v2/models/{{model}}/infer",'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    ok, bad = count("200"), count("404")
    rest.infer(mnist_test_set[0][:1])
    with pytest.raises(RestError) as refused:
        rest.infer(mnist_test_set[0][:1], model_name="resnet")
    assert refused.value.status == 404
    assert count("200") == ok + 1 and count("404") == bad + 1
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    # The answered call names its model and version; the refused one no model answered has them empty.
    assert 'code="200",method="POST /v2/models/{model}/infer",model="mnist",version="1"}' in text
    assert 'code="404",method="POST /v2/models/{model}/infer",model="",version=""}' in text


def test_sigterm_during_rest_load_loses_no_accepted_call(
    trained_repository, mnist_test_set, reference, tmp_path
):
    images = mnist_test_set[0][:32]
    expected = reference(images).argmax(axis=1).tolist()
    server = start_server(
        trained_repository, "--grace-period", "10", log_path=tmp_path / "server.log"
    )
    outcomes: list[object] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller():
        with RestClient(f"127.0.0.1:{server.http_port}", timeout=20) as client:
            while not stop.is_set():
                try:
                    outcome = (
                        "ok"
                        if client.infer(images).argmax(axis=1).tolist() == expected
                        else "wrong answer"
                    )
                except RestError as error:
                    outcome = error.status
                except OSError:  # the port closed after the drain: no call was accepted there
                    outcome = "closed"
                with lock:
                    outcomes.append(outcome)
                if outcome != "ok":
                    return

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    while len(outcomes) < 50:
        threading.Event().wait(0.05)
    assert RestClient(f"127.0.0.1:{server.http_port}").is_ready()
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(30)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert exit_code == 0, server.log()
    assert outcomes.count("ok") >= 50
    # Every call either completed correctly or was refused: 503 while draining, or the port closed.
    assert set(outcomes) <= {"ok", 503, "closed"}, set(map(str, outcomes))


def test_a_taken_http_port_is_one_clear_line(server, trained_repository):
    result = subprocess.run(
        serve_command(trained_repository, port=free_port(), http_port=server.http_port),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "choose another --http-port" in result.stderr.strip().splitlines()[-1]


def test_http_port_0_turns_rest_off(trained_repository, tmp_path):
    with start_server(
        trained_repository, "--http-port", "0", log_path=tmp_path / "server.log"
    ) as server:
        assert "HTTP on :off" in server.log()


def test_mnist_predict_over_rest(server, mnist_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.predict_cli",
            "--api",
            "rest",
            "--target",
            f"127.0.0.1:{server.http_port}",
            "--mnist-test",
            "200",
            "--data-dir",
            str(mnist_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    correct = int(result.stdout.split("accuracy: ")[1].split("/")[0])
    assert correct >= 180, result.stdout
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.predict_cli",
            "--api",
            "rest",
            "--target",
            f"127.0.0.1:{server.http_port}",
            "--mnist-test",
            "65",
            "--data-dir",
            str(mnist_path),
            "--batch-size",
            "65",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert (
        refused.returncode == 1 and refused.stderr.count("\n") == 1 and "HTTP 400" in refused.stderr
    )


@pytest.mark.timeout(120)
def test_locust_load_mixing_rest_and_grpc_has_no_failures(server, mnist_path, tmp_path):
    from loadtest.locust_runner import read_stats_csv, rest_request_name

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.run",
            "--host",
            server.target,
            "--http-host",
            f"127.0.0.1:{server.http_port}",
            "--scenario",
            "mix",
            "--mix-weights",
            "2,1,1,2",
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--run-time",
            "4s",
            "--pool-size",
            "500",
            "--reports-dir",
            str(tmp_path),
            "--name",
            "rest",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=100,
        env={**os.environ, "MNIST_DATA_DIR": str(mnist_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = read_stats_csv(tmp_path / "rest_stats.csv")
    assert stats["Aggregated"].failures == 0
    for name in (rest_request_name(), "KServe ModelInfer x1", "Classify x1"):
        assert stats[name].requests > 0 and stats[name].failures == 0, name
