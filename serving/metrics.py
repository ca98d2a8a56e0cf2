"""Prometheus metrics of the server, and the wrapper that counts and times every gRPC call."""
from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from serving.inference.served_model import ANSWERING, NOBODY

# Every call's metrics name the model and version that answered it (`model`, `version`), as
# Triton's do: several models and versions are served at once. A call no model answered (an
# unknown model, a refused token, a health check) has both labels empty, so a client cannot
# create series by naming models that do not exist.
ANSWERED = ("model", "version")
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
WAIT_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RUN_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)

REQUESTS = Counter(
    "mnist_requests_total",
    "Calls answered, gRPC and REST: by method (gRPC's name, or 'POST /v2/models/{model}/infer'), "
    "status code (gRPC's name or the HTTP number), and the model and version that answered "
    "(empty when none did)",
    ["method", "code", *ANSWERED])
LATENCY = Histogram(
    "mnist_request_latency_seconds",
    "Time from receiving a call to answering it, by method and the model and version that answered",
    ["method", *ANSWERED], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram(
    "mnist_queue_wait_seconds", "Time a request waited in its version's batching queue",
    ANSWERED, buckets=WAIT_BUCKETS)
BATCH_SIZE = Histogram(
    "mnist_batch_size", "Images per onnxruntime call", ANSWERED, buckets=SIZE_BUCKETS)
BATCH_REQUESTS = Histogram(
    "mnist_batch_requests", "Requests coalesced into one onnxruntime call", ANSWERED,
    buckets=SIZE_BUCKETS)
INFERENCE = Histogram(
    "mnist_inference_seconds", "onnxruntime time per batch", ANSWERED, buckets=RUN_BUCKETS)
IMAGES = Counter("mnist_images_total", "Images classified", ANSWERED)
# With --workers, gauges are combined over the worker processes (Prometheus multiprocess mode):
# queue depths and capacities add up (each worker has a queue per version); the model info is the
# same in each; images per worker keep a pid label.
QUEUE_DEPTH = Gauge(
    "mnist_queue_depth", "Requests waiting in the version's batching queue(s)", ANSWERED,
    multiprocess_mode="livesum")
QUEUE_CAPACITY = Gauge(
    "mnist_queue_capacity",
    "Requests the version's batching queue(s) hold before new calls are shed (--max-queue-size "
    "per worker)",
    ANSWERED, multiprocess_mode="livesum")
WORKER_IMAGES = Gauge(
    "mnist_worker_images", "Images classified by this worker process (pid label with --workers)",
    multiprocess_mode="liveall")
DROPPED = Counter(
    "mnist_dropped_requests_total",
    "Requests dropped before inference, by version and reason: queue_full (shed), deadline "
    "(expired while queued), cancelled (the caller went away)",
    [*ANSWERED, "reason"])
MODEL = Gauge(
    "mnist_model_info", "The served model versions and their execution provider (value 1)",
    ["model", "version", "provider"], multiprocess_mode="livemax")
# Model lifecycle (serving.inference.registry): versions refused by their checks, and versions loaded.
LOAD_FAILURES = Counter(
    "mnist_model_load_failures_total", "Model versions refused when loading, by model and reason",
    ["model", "reason"])
VERSION_LOADS = Counter(
    "mnist_model_version_loads_total", "Model versions that passed their checks and took traffic",
    ["model"])
# Sampled payload logging (serving.payload_log): records written, dropped (its queue was full) or
# failed (the file or endpoint refused them). A dropped record never costs its call anything.
PAYLOAD_RECORDS = Counter("mnist_payload_log_records_total",
                          "Payload-log records of sampled calls, by outcome: written, dropped, failed",
                          ["outcome"])


def count_payload_records(outcome: str, records: int) -> None:
    PAYLOAD_RECORDS.labels(outcome).inc(records)


def serve_metrics(port: int, host: str = "0.0.0.0"):
    """Expose /metrics over HTTP from a background thread; returns the HTTP server (shutdown() stops it)."""
    httpd, _thread = start_http_server(port, addr=host)
    return httpd


class PrometheusBatchObserver:
    """The batcher's observer, feeding the histograms above."""

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        BATCH_SIZE.observe(images)
        BATCH_REQUESTS.observe(requests)
        for wait in waits:
            QUEUE_WAIT.observe(wait)

    def batch_finished(self, images: int, seconds: float) -> None:
        INFERENCE.observe(seconds)
        IMAGES.inc(images)
        WORKER_IMAGES.inc(images)

    def request_dropped(self, reason: str) -> None:
        DROPPED.labels(reason).inc()

    def queue_depth(self, requests: int) -> None:
        QUEUE_DEPTH.set(requests)


def timed(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
    """`handler` counted by final status code and timed (serving.grpc_api.handlers applies it once per method)."""
    behaviour = handler.unary_unary
    method = full_method.rsplit("/", 1)[-1]
    # The labelled children are looked up once per method, not on every call (labels() takes a lock
    # and builds a key each time; the profile showed it on the hot path).
    latency = LATENCY.labels(method)
    answered_ok = REQUESTS.labels(method, "OK")

    async def counted(request, context):
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behaviour(request, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except BaseException:
            code = context.code() or grpc.StatusCode.CANCELLED
            raise
        finally:
            (answered_ok if code is grpc.StatusCode.OK else REQUESTS.labels(method, _code_name(code))).inc()
            latency.observe(time.perf_counter() - started)

    return grpc.unary_unary_rpc_method_handler(
        counted, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _code_name(code) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class PrometheusLifecycleObserver:
    """The model registry's observer: which versions serve, loads, refusals, and each version's batches."""

    def batch_observer(self) -> PrometheusBatchObserver:
        return PrometheusBatchObserver()

    def version_loaded(self, name: str, version: int, provider: str) -> None:
        MODEL.labels(name, str(version), provider).set(1)
        VERSION_LOADS.labels(name).inc()

    def version_unloaded(self, name: str, version: int, provider: str) -> None:
        # 0 first: with --workers the parent sums the workers' files, where a removed series would stay at 1.
        MODEL.labels(name, str(version), provider).set(0)
        try:
            MODEL.remove(name, str(version), provider)
        except KeyError:
            pass

    def load_failed(self, name: str, reason: str) -> None:
        LOAD_FAILURES.labels(name, reason).inc()
