"""Sampled payload logging, as KServe's logger does: what a sample of calls sent and got back.

One record per sampled inference call that reached a model: request id, model, version, the
input's shape and sha256, the predicted classes and probabilities, latency and outcome; the raw
pixels only with `include_pixels`. Records go to a JSON-lines file or, for an http(s):// URL, to
an HTTP endpoint as CloudEvents (binary content mode, as KServe's logger posts them).

It never blocks or slows a call: the call's side samples, then puts a tuple of references on a
bounded queue (no copy, no hashing, no JSON); a daemon thread does the rest. A full queue drops
the record, counted (`mnist_payload_log_records_total{outcome="dropped"}`), never the call.
Each worker process has its own queue and thread; file records from several workers interleave
by whole lines (one O_APPEND write per group of lines).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np
import orjson

log = logging.getLogger("mnist-serve.payload-log")

EVENT_TYPE = "io.github.mnist-cnn-serving.inference"  # the CloudEvents `type` of every record
WRITE_GROUP = 256  # records joined into one file write (whole lines, so workers' records never mix)
HTTP_TIMEOUT_S = 5.0

RecordCounter = Callable[[str, int], None]  # (outcome: written | dropped | failed, records)


@dataclass(frozen=True)
class PayloadLogSettings:
    """--payload-log and its companions."""

    destination: str  # a file path (JSON lines), or an http:// or https:// URL (CloudEvents)
    sample_rate: float = 1.0  # share of calls recorded; KServe's logger records every call
    include_pixels: bool = (
        False  # add the input as 8-bit pixels (base64): personal data, off by default
    )
    queue_size: int = 1024  # records waiting for the sink; beyond it records are dropped

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError("--payload-log-sample-rate must be in (0, 1]")
        if self.queue_size < 1:
            raise ValueError("--payload-log-queue-size must be at least 1")

    @property
    def is_http(self) -> bool:
        return self.destination.startswith(("http://", "https://"))


class CallSample(NamedTuple):
    """What a call hands over: references only, turned into a record on the sink's thread."""

    unix_time: float
    request_id: str
    model: str
    version: str
    images: np.ndarray  # float32 [N, 28, 28, 1], scaled to [0, 1]
    probabilities: np.ndarray | None  # [N, classes], None when the call failed
    class_names: tuple[str, ...]
    latency_s: float
    outcome: str  # "OK", or the domain error's name (QueueFull, DeadlinePassed, ShuttingDown, ...)


def payload_record(sample: CallSample, include_pixels: bool) -> dict:
    """The JSON record of one call (a pure function of the sample)."""
    images = np.ascontiguousarray(sample.images, dtype=np.float32)
    record: dict = {
        "id": sample.request_id,
        "time": datetime.fromtimestamp(sample.unix_time, timezone.utc).isoformat(),
        "model": sample.model,
        "version": sample.version,
        "input": {
            "shape": list(images.shape),
            "datatype": "FP32",
            "sha256": hashlib.sha256(images.tobytes()).hexdigest(),
        },
        "latency_ms": round(sample.latency_s * 1000, 3),
        "status": sample.outcome,
        "worker": os.getpid(),
    }
    if sample.probabilities is not None:
        predicted = sample.probabilities.argmax(axis=1)
        record["output"] = {
            "labels": predicted.tolist(),
            "classes": [
                sample.class_names[i] if i < len(sample.class_names) else str(i) for i in predicted
            ],
            "probabilities": np.round(sample.probabilities.astype(np.float64), 6).tolist(),
        }
    if include_pixels:
        pixels = np.rint(images.reshape(images.shape[0], -1) * 255).clip(0, 255).astype(np.uint8)
        record["input"]["pixels_uint8_base64"] = base64.b64encode(pixels.tobytes()).decode("ascii")
    return record


class FileSink:
    """JSON lines appended to a file; a group of lines is one write, so lines never interleave."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise OSError(
                f"cannot open the payload log {path} ({error.strerror}); "
                "create its folder or choose another --payload-log"
            ) from None

    def write(self, records: list[dict]) -> None:
        os.write(self._fd, b"".join(orjson.dumps(r) + b"\n" for r in records))


class CloudEventsSink:
    """Each record POSTed as a CloudEvent in binary content mode, over one kept-alive connection."""

    def __init__(self, url: str) -> None:
        from cloudevents.core.bindings.http import to_binary  # only when the sink is HTTP
        from cloudevents.core.formats.json import JSONFormat
        from cloudevents.core.v1.event import CloudEvent

        self._to_binary, self._format, self._event = to_binary, JSONFormat(), CloudEvent
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "localhost", parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._source = f"/mnist-serve/{socket.gethostname()}"
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._connection = kind(self._host, self._port, timeout=HTTP_TIMEOUT_S)
        return self._connection

    def write(self, records: list[dict]) -> None:
        for record in records:
            event = self._event(
                {
                    "type": EVENT_TYPE,
                    "source": f"{self._source}/{record['model']}",
                    "id": record["id"],
                    "subject": f"{record['model']}/{record['version']}",
                    "datacontenttype": "application/json",
                },
                record,
            )
            message = self._to_binary(event, self._format)
            connection = self._connect()
            try:
                connection.request("POST", self._path, body=message.body, headers=message.headers)
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                self._connection = None  # reconnect next time
                connection.close()
                raise
            if answer.status >= 300:
                raise OSError(f"the endpoint answered HTTP {answer.status}")


class PayloadLogger:
    """The bounded queue and the thread that empties it into a sink."""

    def __init__(self, settings: PayloadLogSettings, count: RecordCounter) -> None:
        self.settings = settings
        self._count = count  # serving.metrics.count_payload_records: no Prometheus import here
        self._queue: queue.Queue[CallSample | None] = queue.Queue(settings.queue_size)
        self._sink = (
            CloudEventsSink(settings.destination)
            if settings.is_http
            else FileSink(settings.destination)
        )
        self._random = random.Random()
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._thread.start()
        self._last_failure_log = 0.0

    def sampled(self) -> bool:
        rate = self.settings.sample_rate
        return rate >= 1.0 or self._random.random() < rate

    def offer(self, sample: CallSample) -> None:
        """Queue a sample for the sink, or drop it (counted) when the sink is behind. Never blocks."""
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self._count("dropped", 1)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            samples = [self._queue.get()]
            while len(samples) < WRITE_GROUP and not self._queue.empty():
                samples.append(self._queue.get_nowait())
            done = samples[-1] is None
            samples = [s for s in samples if s is not None]
            if samples:
                self._write(samples)
            if done:
                return

    def _write(self, samples: list[CallSample]) -> None:
        records = [payload_record(s, self.settings.include_pixels) for s in samples]
        try:
            self._sink.write(records)
        except (OSError, http.client.HTTPException) as error:
            self._count("failed", len(records))
            now = time.monotonic()
            if now - self._last_failure_log > 10:  # one line per 10 s, not one per record
                self._last_failure_log = now
                log.warning(
                    "payload log: %d record(s) not written to %s: %s",
                    len(records),
                    self.settings.destination,
                    error,
                )
            return
        self._count("written", len(records))


# The process's logger (one per worker), installed by the Server at start; None: payload logging off,
# and a call pays one global lookup for it.
active: PayloadLogger | None = None


def install(settings: PayloadLogSettings | None, count: RecordCounter) -> PayloadLogger | None:
    global active
    active = PayloadLogger(settings, count) if settings is not None else None
    if active is not None:
        log.info(
            "payload log: %.4g of calls to %s%s",
            settings.sample_rate,
            settings.destination,
            " with pixels" if settings.include_pixels else "",
        )
    return active


def uninstall() -> None:
    global active
    logger, active = active, None
    if logger is not None:
        logger.close()
