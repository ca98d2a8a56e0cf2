"""The drawing page: static files from the package, and two small JSON endpoints it calls.

- `GET /` and `/static/...`: index.html, page.js, page.css and a sprite of MNIST test digits,
  shipped in the package (no build step, nothing fetched from elsewhere: a Content-Security-Policy
  of 'self' makes the browser refuse anything else).
- `GET /api/model`: the served model's name, version, classes and execution provider.
- `POST /api/classify`: a PNG or JPEG of a drawing, framed the way MNIST digits were (the same
  serving.inputs.framing the gRPC API uses) and classified; the answer includes the 28x28 pixels
  the model saw, so the page can show them. Random MNIST digits go through the standard
  `/v2/models/{model}/infer` instead, as UINT8 JSON.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from aiohttp import web

from serving.http_api import codec
from serving.inference.served_model import ModelLookup
from serving.inputs.framing import decode_encoded_image

STATIC = Path(__file__).parent / "static"
# The page loads only its own files; inline scripts and styles, and every other origin, are refused.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}


class PageRoutes:
    def __init__(self, lookup: ModelLookup) -> None:
        self.lookup = lookup  # the page shows and uses the default model's newest ready version

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.index)
        router.add_static("/static", STATIC)
        router.add_get("/api/model", self.describe)
        router.add_post("/api/classify", self.classify)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    async def describe(self, request: web.Request) -> web.Response:
        model = self.lookup.resolve("", "")
        return web.Response(
            body=codec.dumps(
                {
                    "model_name": model.name,
                    "model_version": model.version_label,
                    "execution_provider": model.provider,
                    "class_names": model.class_names,
                    "test_accuracy": model.metadata.test_accuracy,
                    "recipe": model.metadata.recipe,
                }
            ),
            content_type=codec.JSON_TYPE,
        )

    async def classify(self, request: web.Request) -> web.Response:
        encoded = await request.read()
        # Decoding and framing an image costs milliseconds: off the event loop, as gRPC calls wait there.
        image = await asyncio.get_running_loop().run_in_executor(
            None, decode_encoded_image, encoded
        )
        model = self.lookup.resolve("", "")
        probabilities = (await model.predict(image[np.newaxis]))[0]
        label = int(probabilities.argmax())
        framed = np.round(image.reshape(-1) * 255.0).astype(np.uint8)
        return web.Response(
            body=codec.dumps(
                {
                    "model_name": model.name,
                    "model_version": model.version_label,
                    "label": label,
                    "class_name": model.class_names[label],
                    "confidence": float(probabilities[label]),
                    "probabilities": probabilities,
                    "framed": framed,  # the 28x28 pixels the model saw, 0..255, row-major
                }
            ),
            content_type=codec.JSON_TYPE,
        )
