"""`mnist-predict` against the session's server: MNIST digits over both gRPC APIs, PNG/JPEG files.

Each count of correct answers is compared with what onnxruntime computes in-process on the same
model and images, so a server (or a client) that answers differently fails, not just a bad one.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.repository import load_version
from serving.process import free_port


@pytest.fixture(scope="module")
def reference_labels(trained_repository):
    session = ort.InferenceSession(
        str(load_version(trained_repository, "mnist").model_path),
        providers=["CPUExecutionProvider"],
    )
    return lambda images: session.run(
        None, {"images": (images.astype(np.float32) / 255)[..., None]}
    )[0].argmax(axis=1)


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.predict_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("api", ["classifier", "kserve"])
def test_mnist_test_digits_over_each_grpc_api(
    api, server, mnist_path, mnist_test_set, reference_labels
):
    images, labels = mnist_test_set
    result = predict(
        "--target",
        server.target,
        "--api",
        api,
        "--mnist-test",
        "200",
        "--batch-size",
        "50",
        "--data-dir",
        str(mnist_path),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    expected = int((reference_labels(images[:200]) == labels[:200]).sum())
    assert re.search(r"accuracy: (\d+)/200", result.stdout).group(1) == str(expected), result.stdout


def test_png_and_jpeg_files(server, mnist_test_set, reference_labels, tmp_path):
    images, _ = mnist_test_set
    paths = []
    for index in range(6):  # MNIST digits as files: light ink on black, as MNIST stores them
        path = tmp_path / f"digit{index}.{'png' if index % 2 == 0 else 'jpg'}"
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(
            buffer, format="PNG" if path.suffix == ".png" else "JPEG", quality=95
        )
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    result = predict("--target", server.target, *map(str, paths))
    assert result.returncode == 0, result.stderr
    answers = dict(re.findall(r"^(\S+digit\d\.\w+): (\d)$", result.stdout, flags=re.MULTILINE))
    assert list(answers) == [str(path) for path in paths], result.stdout
    expected = reference_labels(images[:6])
    assert [int(answers[str(path)]) for path in paths] == expected.tolist()
    assert "answered by mnist version 1" in result.stdout


def test_errors_are_one_line(server, mnist_path, tmp_path):
    dead = predict(
        "--target",
        f"127.0.0.1:{free_port()}",
        "--mnist-test",
        "5",
        "--data-dir",
        str(mnist_path),
        "--timeout",
        "1",
    )
    assert (
        dead.returncode == 1
        and len(dead.stderr.strip().splitlines()) == 1
        and "UNAVAILABLE" in dead.stderr
    )
    files_over_kserve = predict(
        "--target", server.target, "--api", "kserve", str(tmp_path / "x.png")
    )
    assert files_over_kserve.returncode != 0 and "Traceback" not in files_over_kserve.stderr
    assert "--api kserve takes --mnist-test" in files_over_kserve.stderr
