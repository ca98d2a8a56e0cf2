"""Prometheus metrics of the server, and what counts and times every call (gRPC and REST).

Each metric's documentation string is its reference (docs/monitoring.md lists them); the names
are stable, and the per-call and per-batch metrics carry the `model` and `version` that answered.
"""

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
    ["method", "code", *ANSWERED],
)
LATENCY = Histogram(
    "mnist_request_latency_seconds",
    "Time from receiving a call to answering it, by method and the model and version that answered",
    ["method", *ANSWERED],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "mnist_queue_wait_seconds",
    "Time a request waited in its version's batching queue",
    ANSWERED,
    buckets=WAIT_BUCKETS,
)
BATCH_SIZE = Histogram(
    "mnist_batch_size", "Images per onnxruntime call", ANSWERED, buckets=SIZE_BUCKETS
)
BATCH_REQUESTS = Histogram(
    "mnist_batch_requests",
    "Requests coalesced into one onnxruntime call",
    ANSWERED,
    buckets=SIZE_BUCKETS,
)
INFERENCE = Histogram(
    "mnist_inference_seconds", "onnxruntime time per batch", ANSWERED, buckets=RUN_BUCKETS
)
IMAGES = Counter("mnist_images_total", "Images classified", ANSWERED)
# With --workers, gauges are combined over the worker processes (Prometheus multiprocess mode):
# queue depths and capacities add up (each worker has a queue per version); the model info is the
# same in each; images per worker keep a pid label.
QUEUE_DEPTH = Gauge(
    "mnist_queue_depth",
    "Requests waiting in the version's batching queue(s)",
    ANSWERED,
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "mnist_queue_capacity",
    "Requests the version's batching queue(s) hold before new calls are shed (--max-queue-size "
    "per worker)",
    ANSWERED,
    multiprocess_mode="livesum",
)
WORKER_IMAGES = Gauge(
    "mnist_worker_images",
    "Images classified by this worker process (pid label with --workers)",
    multiprocess_mode="liveall",
)
DROPPED = Counter(
    "mnist_dropped_requests_total",
    "Requests dropped before inference, by version and reason: queue_full (shed), deadline "
    "(expired while queued), cancelled (the caller went away)",
    [*ANSWERED, "reason"],
)
MODEL = Gauge(
    "mnist_model_info",
    "The served model versions and their execution provider (value 1)",
    ["model", "version", "provider"],
    multiprocess_mode="livemax",
)
# Model lifecycle (serving.inference.registry): versions refused by their checks, versions loaded.
LOAD_FAILURES = Counter(
    "mnist_model_load_failures_total",
    "Model versions refused when loading, by model and reason",
    ["model", "reason"],
)
VERSION_LOADS = Counter(
    "mnist_model_version_loads_total",
    "Model versions that passed their checks and took traffic",
    ["model"],
)
# Sampled payload logging (serving.payload_log): records written, dropped (its queue was full) or
# failed (the file or endpoint refused them). A dropped record never costs its call anything.
PAYLOAD_RECORDS = Counter(
    "mnist_payload_log_records_total",
    "Payload-log records of sampled calls, by outcome: written, dropped, failed",
    ["outcome"],
)


def count_payload_records(outcome: str, records: int) -> None:
    PAYLOAD_RECORDS.labels(outcome).inc(records)


def serve_metrics(port: int, host: str = "0.0.0.0"):
    """Serve /metrics over HTTP from a background thread; returns the server (shutdown() stops)."""
    httpd, _thread = start_http_server(port, addr=host)
    return httpd


class PrometheusBatchObserver:
    """One version's batcher observer, feeding the histograms above with that version's labels."""

    def __init__(self, model: str = "", version: str = "", queue_capacity: int = 0) -> None:
        labels = (model, version)
        self._labels = labels
        # The children are looked up once per version, not on every batch (labels() takes a lock).
        self._batch_size = BATCH_SIZE.labels(*labels)
        self._batch_requests = BATCH_REQUESTS.labels(*labels)
        self._queue_wait, self._inference = QUEUE_WAIT.labels(*labels), INFERENCE.labels(*labels)
        self._images, self._queue_depth = IMAGES.labels(*labels), QUEUE_DEPTH.labels(*labels)
        self._queue_depth.set(0)  # the series exists from the load on, not from the first queueing
        if queue_capacity:
            QUEUE_CAPACITY.labels(*labels).set(queue_capacity)

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        self._batch_size.observe(images)
        self._batch_requests.observe(requests)
        for wait in waits:
            self._queue_wait.observe(wait)

    def batch_finished(self, images: int, seconds: float) -> None:
        self._inference.observe(seconds)
        self._images.inc(images)
        WORKER_IMAGES.inc(images)

    def request_dropped(self, reason: str) -> None:
        DROPPED.labels(*self._labels, reason).inc()

    def queue_depth(self, requests: int) -> None:
        self._queue_depth.set(requests)


class _CallMetrics:
    """One method's labelled children, each (code, model, version) looked up once.

    labels() takes a lock and builds a key each time; the profile showed it on the hot path, so a
    call costs one dict lookup here instead. Answered calls are keyed by (model, version) alone:
    grpc.StatusCode's hash is a Python function, measured at ~0.3 us a call on this machine.
    """

    def __init__(self, method: str, ok) -> None:
        self.method = method
        self.ok = ok  # grpc.StatusCode.OK, or 200
        self._answered: dict[tuple[str, str], tuple] = {}
        self._failed: dict[tuple[str, tuple[str, str]], tuple] = {}

    def record(self, code, seconds: float) -> None:
        answered = ANSWERING.get()
        if code == self.ok:  # identity for the enum, C-level for ints
            children = self._answered.get(answered)
            if children is None:
                children = self._answered[answered] = self._children(_code_name(code), answered)
        else:
            key = (_code_name(code), answered)
            children = self._failed.get(key)
            if children is None:
                children = self._failed[key] = self._children(key[0], answered)
        children[0].inc()
        children[1].observe(seconds)

    def _children(self, code: str, answered: tuple[str, str]) -> tuple:
        return REQUESTS.labels(self.method, code, *answered), LATENCY.labels(self.method, *answered)


_HTTP_CALLS: dict[str, _CallMetrics] = {}  # by "<HTTP method> <route>"


def start_call() -> None:
    """A call begins: no model answered it yet (one keep-alive connection's task serves many)."""
    ANSWERING.set(NOBODY)


def record_call(method: str, code: int, seconds: float) -> None:
    """Count and time a finished REST call under the model and version it resolved to."""
    calls = _HTTP_CALLS.get(method)
    if calls is None:
        calls = _HTTP_CALLS[method] = _CallMetrics(method, 200)
    calls.record(code, seconds)


def timed(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
    """`handler` counted by final status code and timed (grpc_api.handlers wraps each method)."""
    behaviour = handler.unary_unary
    calls = _CallMetrics(full_method.rsplit("/", 1)[-1], grpc.StatusCode.OK)

    async def counted(request, context):
        started = time.perf_counter()
        ANSWERING.set(NOBODY)
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behaviour(request, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except BaseException:
            code = context.code() or grpc.StatusCode.CANCELLED
            raise
        finally:
            calls.record(code, time.perf_counter() - started)

    return grpc.unary_unary_rpc_method_handler(
        counted,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _code_name(code) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class PrometheusLifecycleObserver:
    """The registry's observer: versions served, loads, refusals, and each version's batches."""

    def __init__(self) -> None:
        # Loaded copies per (model, version, provider): a version whose files changed is loaded anew
        # and swapped in, and the old copy's unload must not take the new copy's series away.
        self._copies: dict[tuple[str, str, str], int] = {}

    def batch_observer(
        self, name: str = "", version: int | None = None, queue_capacity: int = 0
    ) -> PrometheusBatchObserver:
        label = "" if version is None else str(version)
        return PrometheusBatchObserver(name, label, queue_capacity)

    def version_loaded(self, name: str, version: int, provider: str) -> None:
        key = (name, str(version), provider)
        self._copies[key] = self._copies.get(key, 0) + 1
        MODEL.labels(*key).set(1)
        VERSION_LOADS.labels(name).inc()

    def version_unloaded(self, name: str, version: int, provider: str) -> None:
        key = (name, str(version), provider)
        self._copies[key] = self._copies.get(key, 1) - 1
        if self._copies[key] > 0:
            return  # a newer copy of the same version serves on
        del self._copies[key]
        # 0 first: with --workers the parent sums the workers' files, where a removed one stays 1.
        for gauge, labels in ((MODEL, key), (QUEUE_DEPTH, key[:2]), (QUEUE_CAPACITY, key[:2])):
            gauge.labels(*labels).set(0)
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def load_failed(self, name: str, reason: str) -> None:
        LOAD_FAILURES.labels(name, reason).inc()
