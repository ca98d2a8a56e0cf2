"""The page's own endpoints on the session's server: /api/classify, the page and its files, the sample."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.support.serving import png_bytes


def test_classify_endpoint_frames_a_drawing_and_returns_what_the_model_saw(
    rest, mnist_test_set, reference
):
    images, labels = mnist_test_set
    index = next(i for i in range(100) if reference(images[i : i + 1]).argmax() == labels[i])
    # Dark ink on white paper, 10x the size, off-centre: what a person might upload.
    paper = np.full((400, 400), 255, np.uint8)
    paper[40:320, 100:380] = 255 - np.kron(images[index], np.ones((10, 10), np.uint8))
    reply = rest.request("POST", "/api/classify", png_bytes(paper), {"Content-Type": "image/png"})
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
