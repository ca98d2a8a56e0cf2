"""Tools for the model-lifecycle tests: versions with their own weights, published the way training
publishes them (staged, then renamed into place), broken versions, callers of every API.

A "variant" is a trained model whose last layer's bias is shifted by a seeded amount: a real,
valid ONNX file with the contract's signature whose answers differ from the original's on some
digits, so a test can tell which version computed an answer.

Registered as a plugin in tests/conftest.py: its fixtures `repository` and `version_reference`
serve the lifecycle and repository-fault tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from core.contract import to_model_input
from core.metadata import ModelMetadata
from core.repository import CONFIG_FILENAME, METADATA_FILENAME, MODEL_FILENAME, triton_config
from serving.memory import rss_bytes


def variant_bytes(source: Path, seed: int) -> bytes:
    """model.onnx with the output layer's bias shifted by seeded noise (seed 0: the file unchanged)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    if seed:
        rng = np.random.default_rng(seed)
        bias = next(
            i for i in model.graph.initializer if i.dims == [10] and "dense" in i.name.lower()
        )
        values = numpy_helper.to_array(bias) + rng.normal(0.0, 4.0, size=10).astype(np.float32)
        bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
    return model.SerializeToString()


def wrong_signature_bytes() -> bytes:
    """A valid ONNX model that takes flat pixels [N, 784] as 'pixels': not the server's contract."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.zeros((784, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "w"], ["probabilities"])],
        "flat",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def publish(
    repository: Path,
    name: str,
    version: int,
    onnx_bytes: bytes,
    metadata: ModelMetadata | None = None,
    sha256: str | None = None,
) -> Path:
    """Write <repository>/<name>/<version> atomically (staging folder, then rename), as mnist-train does.

    `sha256` overrides the checksum written to metadata.json (a corrupted file's is the original's).
    """
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir()
    (staging / MODEL_FILENAME).write_bytes(onnx_bytes)
    meta = dataclasses.replace(
        metadata or ModelMetadata(),
        model_name=name,
        version=version,
        model_sha256=sha256 or hashlib.sha256(onnx_bytes).hexdigest(),
    )
    (staging / METADATA_FILENAME).write_text(meta.to_json())
    staging.rename(model_dir / str(version))
    return model_dir / str(version)


def write_config(repository: Path, name: str, version_policy: str = "") -> None:
    """config.pbtxt as training writes it, plus a version_policy line; replaced atomically."""
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    temporary = model_dir / f".{CONFIG_FILENAME}.tmp"
    temporary.write_text(
        triton_config(name, 64) + (f"version_policy: {version_policy}\n" if version_policy else "")
    )
    temporary.rename(model_dir / CONFIG_FILENAME)


class Reference:
    """In-process onnxruntime of each version's own file: what a version's answers must be."""

    def __init__(self) -> None:
        self._sessions: dict[Path, object] = {}

    def __call__(self, model_file: Path, images: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        if model_file not in self._sessions:
            self._sessions[model_file] = ort.InferenceSession(
                str(model_file), providers=["CPUExecutionProvider"]
            )
        return self._sessions[model_file].run(None, {"images": to_model_input(images)})[0]


@pytest.fixture()
def repository(trained_repository, tmp_path) -> Path:
    """A copy of the trained `mnist` model alone (version 1), to publish into while serving."""
    copy = tmp_path / "repository"
    copy.mkdir()
    shutil.copytree(trained_repository / "mnist", copy / "mnist")
    return copy


@pytest.fixture(scope="module")
def version_reference() -> Reference:
    return Reference()


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample over the series whose labels include `labels`."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if match:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
    return total


def rss_kib(pid: int) -> int:
    return rss_bytes(pid) // 1024


@dataclass
class Answer:
    api: str
    model: str
    version: str
    indices: np.ndarray  # which test digits were sent
    probabilities: np.ndarray
    started: float  # time.time() when the call was sent
    seconds: float


@dataclass
class Load:
    """Callers of the three APIs (mnist.v1 Classify, KServe v2 gRPC, KServe v2 REST), each on its own thread."""

    target: str
    http_url: str
    images: np.ndarray
    model: str = "mnist"
    version: str = ""
    callers: int = 32
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        apis = ("classify", "kserve_grpc", "kserve_rest")
        for index in range(self.callers):
            thread = threading.Thread(target=self._run, args=(apis[index % 3], index), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def calls_since(self, instant: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.started >= instant]

    def _run(self, api: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        call = self._caller(api)
        while not self._stop.is_set():
            indices = rng.integers(0, len(self.images), size=int(rng.integers(1, 9)))
            started, clock = time.time(), time.perf_counter()
            try:
                model, version, probabilities = call(self.images[indices])
            except Exception as err:  # noqa: BLE001 - every failed call is a finding
                self.failures.append(f"{api}: {type(err).__name__}: {err}")
                continue
            self.answers.append(
                Answer(
                    api,
                    model,
                    version,
                    indices,
                    probabilities,
                    started,
                    time.perf_counter() - clock,
                )
            )

    def _caller(self, api: str):
        if api == "classify":
            from serving.client import ClassifierClient

            client = ClassifierClient(self.target)

            def classify(images):
                result = client.classify(images, model_name=self.model, model_version=self.version)
                return result.model_name, result.model_version, result.probabilities

            return classify
        if api == "kserve_grpc":
            import tritonclient.grpc as triton

            client = triton.InferenceServerClient(self.target)

            def infer_grpc(images):
                tensor = triton.InferInput("images", [len(images), 28, 28, 1], "UINT8")
                tensor.set_data_from_numpy(images.reshape(-1, 28, 28, 1).astype(np.uint8))
                result = client.infer(
                    self.model, [tensor], model_version=self.version, client_timeout=30
                )
                response = result.get_response()
                return response.model_name, response.model_version, result.as_numpy("probabilities")

            return infer_grpc
        import tritonclient.http as triton_http

        client = triton_http.InferenceServerClient(
            self.http_url.removeprefix("http://"), network_timeout=30
        )

        def infer_rest(images):
            tensor = triton_http.InferInput("images", [len(images), 28, 28, 1], "UINT8")
            tensor.set_data_from_numpy(
                images.reshape(-1, 28, 28, 1).astype(np.uint8), binary_data=True
            )
            result = client.infer(self.model, [tensor], model_version=self.version)
            response = result.get_response()
            return (
                response["model_name"],
                response["model_version"],
                result.as_numpy("probabilities"),
            )

        return infer_rest


def wrong_answers(
    answers: list[Answer],
    model_files: dict[tuple[str, str], Path],
    images: np.ndarray,
    reference: Reference,
) -> list[str]:
    """Every answer whose probabilities differ from its own version's file (by model and version)."""
    problems = []
    for answer in answers:
        key = (answer.model, answer.version)
        if key not in model_files:
            problems.append(f"{answer.api}: answered by unexpected {key}")
            continue
        expected = reference(model_files[key], images[answer.indices])
        if not np.allclose(answer.probabilities, expected, atol=1e-4):
            problems.append(
                f"{answer.api}: {key} differs from its file by "
                f"{np.abs(answer.probabilities - expected).max():.2e}"
            )
    return problems


def log_instant(log: str, pattern: str) -> float:
    """time.time() of the first log line matching `pattern` (the log's asctime, millisecond precision)."""
    for line in log.splitlines():
        if re.search(pattern, line):
            stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
            return time.mktime(stamp) + int(line[20:23]) / 1000
    raise AssertionError(f"no log line matches {pattern!r}")


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll a state the server exposes (metrics, health, log) until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
