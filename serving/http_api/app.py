"""The REST transport: KServe v2 routes, Triton's extensions, error and metrics middleware, and the
HTTP server's lifecycle.

Handlers are thin: they check the model name and version, turn the body into arrays
(serving.http_api.codec), await the same ServedModel the gRPC APIs use, and answer. Triton's
repository, model-control, configuration and statistics endpoints call
serving.grpc_api.triton.TritonExtensions, the implementation the gRPC servicer calls too. Any
ServingError they raise becomes `{"error": "<message>"}` with the code from
serving.http_api.status; aiohttp's own refusals (unknown path, wrong method, body over
--max-message-bytes) get the same body. Every call is counted in mnist_requests_total with
method "<HTTP method> <route>", the HTTP code and the model and version that answered it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from serving import __version__, draining, metrics, tracing
from serving.grpc_api.triton import TritonExtensions
from serving.http_api import codec, page, triton_json
from serving.http_api.status import status_for
from serving.inference.errors import ServingError, ShuttingDown
from serving.inference.served_model import ModelLookup

log = logging.getLogger("mnist-serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOT_READY = 400  # the protocol: 200 means ready, a 4xx code means not (Triton answers 400)


def json_response(value, status: int = 200) -> web.Response:
    return web.Response(body=codec.dumps(value), status=status, content_type=codec.JSON_TYPE)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=codec.error_body(message), status=status, content_type=codec.JSON_TYPE)


@web.middleware
async def count_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: counts and times every call by route and the code it was answered with."""
    started = time.perf_counter()
    metrics.start_call()
    status = 499  # the client went away before an answer (nginx's convention)
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        method = f"{request.method} {resource.canonical if resource is not None else '(no route)'}"
        metrics.record_call(method, status, time.perf_counter() - started)


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors and aiohttp's refusals become the protocol's {"error": "..."} body."""
    try:
        return await handler(request)
    except ServingError as error:
        response = error_response(status_for(error), str(error))
        if isinstance(
            error, ShuttingDown
        ):  # draining: when to retry, and no keep-alive (serving.draining)
            response.headers.update(draining.http_headers())
            response.force_close()
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, _refusal_message(request, error))
    except (
        Exception
    ) as error:  # a bug: answer 500 with its message, log the traceback, keep serving
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}")


def body_deadline(seconds: float):
    """Middleware: the whole body must arrive within `seconds` of the head, else 408 and close.

    aiohttp waits for a body as long as the client keeps the connection open; a client sending a
    byte a minute would hold its connection (and a handler) for ever. The body is read here, once
    (aiohttp keeps it for the handler's own read).
    """

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists and request.method in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(seconds):
                    await request.read()
            except TimeoutError:
                response = error_response(
                    408,
                    f"the request body did not arrive within {seconds:g} s of "
                    "its headers (--http-body-timeout); send it at once",
                )
                response.force_close()  # the rest of the body is not waited for
                return response
        return await handler(request)

    return read_body_in_time


def _refusal_message(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return (
            f"{request.method} {request.path} is not an endpoint of this server; the KServe v2 API "
            "is under /v2 (e.g. /v2/models/mnist/infer), the drawing page at /"
        )
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path}; use {error.headers.get('Allow', 'another method')}"
    if error.status == 413:
        return (
            f"the request body is larger than --max-message-bytes ({request.app['max_body_bytes']} bytes); "
            "send fewer images per call"
        )
    return error.text or error.reason


class KServeRoutes:
    """The Open Inference Protocol's REST endpoints over every served model and version."""

    def __init__(self, lookup: ModelLookup, is_ready: Callable[[], bool]) -> None:
        self.lookup = lookup  # the registry: each call's (model, version) is looked up in it
        self._is_ready = is_ready  # the Server's readiness: False while loading and while draining

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v2/health/live", self.live)
        router.add_get("/v2/health/ready", self.ready)
        router.add_get("/v2", self.server_metadata)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            router.add_get(base, self.model_metadata)
            router.add_get(base + "/ready", self.model_ready)
            router.add_post(base + "/infer", self.infer)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()  # the process answers: it is live, also while draining

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._is_ready() else NOT_READY)

    async def server_metadata(self, request: web.Request) -> web.Response:
        # The same list as gRPC's ServerMetadata: one server, one set of extensions.
        return json_response(
            codec.server_metadata(__version__, TritonExtensions(self.lookup).extensions)
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        model = self.lookup.resolve(name, version)
        return json_response(
            codec.model_metadata(model.name, model.version_label, len(model.class_names))
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self._is_ready() and self.lookup.is_ready(*_model_and_version(request))
        return web.Response(status=200 if ready else NOT_READY)

    async def infer(self, request: web.Request) -> web.Response:
        self.lookup.resolve(
            *_model_and_version(request)
        )  # an unknown model is refused before its body is read
        body = await request.read()
        parsed = codec.parse_infer_request(
            body, request.headers.get(codec.HEADER_LENGTH), self.lookup.max_batch_size
        )
        deadline = None if parsed.timeout_s is None else time.monotonic() + parsed.timeout_s
        # Chosen again once the body is in, and queued with no await between: the answer names the version
        # that computed it, also when a new version took over while the body was arriving.
        model = self.lookup.resolve(*_model_and_version(request))
        if tracing.on:
            tracing.annotate_model(model.name, model.version_label)
        request_id = (
            parsed.request_id or request.headers.get("X-Request-Id", "")[:128]
        )  # Envoy sets one
        probabilities = await model.predict(parsed.images, deadline, request_id)
        answer, headers = codec.infer_response(
            parsed, model.name, model.version_label, probabilities
        )
        return web.Response(body=answer, headers=headers)


class TritonRoutes:
    """Triton's HTTP paths and JSON shapes, so that tritonclient.http's calls of the same names work:

        GET  /v2/models/{model}[/versions/{version}]/config   the model's config.pbtxt as JSON
        GET  /v2/models[/{model}[/versions/{version}]]/stats  {"model_stats": [...]}
        POST /v2/repository/index                              [{"name", "version", "state", "reason"}, ...]
        POST /v2/repository/models/{model}/load                200, empty body (explicit mode only)
        POST /v2/repository/models/{model}/unload              200, empty body (explicit mode only)

    The answers are the gRPC side's protobuf messages, written as Triton's JSON by triton_json.message_json.
    """

    def __init__(self, extensions: TritonExtensions) -> None:
        self.extensions = extensions

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get(
            "/v2/models/stats", self.statistics
        )  # a fixed path: wins over /v2/models/{model}
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            router.add_get(base + "/config", self.config)
            router.add_get(base + "/stats", self.statistics)
        router.add_post("/v2/repository/index", self.index)
        router.add_post("/v2/repository/models/{model}/load", self.load)
        router.add_post("/v2/repository/models/{model}/unload", self.unload)

    async def config(self, request: web.Request) -> web.Response:
        return json_response(
            triton_json.message_json(self.extensions.config(*_model_and_version(request)))
        )

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return json_response(triton_json.message_json(self.extensions.statistics(name, version)))

    async def index(self, request: web.Request) -> web.Response:
        ready = codec.parse_repository_request(await request.read()).ready
        # Triton's REST answer is the list itself; gRPC wraps it in RepositoryIndexResponse.models.
        return json_response(
            triton_json.message_json(self.extensions.index(ready_only=ready))["models"]
        )

    async def load(self, request: web.Request) -> web.Response:
        parameters = codec.parse_repository_request(await request.read()).parameters
        await self.extensions.load(request.match_info["model"], parameters)
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        parameters = codec.parse_repository_request(await request.read()).parameters
        await self.extensions.unload(request.match_info["model"], parameters)
        return web.Response()


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def build_app(
    lookup: ModelLookup, is_ready: Callable[[], bool], max_body_bytes: int
) -> web.Application:
    """The aiohttp application: KServe v2 and Triton's extensions under /v2, the drawing page at /
    (serving.http_api.page)."""
    # With tracing on, a server span around everything else (serving.tracing); off, no middleware.
    traced = [tracing.http_middleware()] if tracing.on else []
    app = web.Application(
        middlewares=[*traced, count_calls, answer_errors], client_max_size=max_body_bytes
    )
    app["max_body_bytes"] = max_body_bytes
    KServeRoutes(lookup, is_ready).add_to(app.router)
    TritonRoutes(TritonExtensions(lookup)).add_to(app.router)
    page.PageRoutes(lookup).add_to(app.router)
    return app


class HttpServer:
    """The REST port, on the running event loop (the one grpc.aio uses): start() and stop()."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        shutdown_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        idle_timeout: float = 75.0,
        body_timeout: float = 30.0,
    ) -> None:
        # Innermost (after the token check): a body is read only for a call that may be answered.
        app.middlewares.append(body_deadline(body_timeout))
        # No access log: one line per call would cost more than the call on a busy server.
        # keepalive_timeout is aiohttp's idle timer, armed at connect and after each answer: it
        # closes connections that never finish a request head (serving.connection_limits).
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout
        )
        self._host, self._port, self._shutdown_timeout = host, port, shutdown_timeout
        self._ssl_context = ssl_context  # --tls-cert: HTTPS (serving.http_api.security.ssl_context)
        # --workers share the port as they share gRPC's (SO_REUSEPORT): REST gets every core too.
        self._reuse_port = reuse_port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._host,
            self._port,
            shutdown_timeout=self._shutdown_timeout,
            reuse_port=self._reuse_port,
            ssl_context=self._ssl_context,
        )
        await site.start()

    async def stop(self) -> None:
        """Stop listening, let calls in progress finish (up to the shutdown timeout), close connections."""
        await self._runner.cleanup()
