"""The server's own view of a load window, from its Prometheus metrics: the prediction core's.

Locust measures from its side: its latencies include its own time to build, send and read each call,
and on a small machine that time can be most of them. The server's histograms time each call from
its arrival to its answer, so a report that prints both shows what the server did and what the load
generator added. Two scrapes of /metrics, one as the measured window opens and one after it closed;
everything here is a difference between them:

- calls/s and p50/p95/p99 per method (mnist_requests_total, mnist_request_latency_seconds),
- queue wait p50/p99 (mnist_queue_wait_seconds), onnxruntime time per batch, mean and p99
  (mnist_inference_seconds), images and requests per batch (mnist_batch_size, mnist_batch_requests).

Percentiles come from histogram buckets as Prometheus' histogram_quantile computes them (linear
inside the bucket), so they are as fine as the buckets.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

# name -> {labels (sorted tuple, "le" included for buckets): value}, summed over the other labels
Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]

KEEP_LABELS = {"method", "le"}  # model, version, code, pid...: summed over


def parse(text: str) -> Scrape:
    """The samples of the families this report reads, summed over every label but method and le."""
    from prometheus_client.parser import text_string_to_metric_families

    scrape: Scrape = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("mnist_"):
            continue
        for sample in family.samples:
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k in KEEP_LABELS))
            scrape[sample.name][key] += sample.value
    return scrape


def scrape(metrics_url: str, timeout: float = 5.0) -> Scrape:
    """/metrics now; an empty scrape when it cannot be read (the report then says so)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as reply:
            return parse(reply.read().decode())
    except OSError:
        return {}


def _delta(before: Scrape, after: Scrape, name: str) -> dict[tuple, float]:
    now, then = after.get(name, {}), before.get(name, {})
    return {key: value - then.get(key, 0.0) for key, value in now.items()}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets; nan if empty."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def _buckets(delta: dict[tuple, float], method: str | None = None) -> list[tuple[float, float]]:
    out: dict[float, float] = defaultdict(float)
    for key, value in delta.items():
        labels = dict(key)
        if method is None or labels.get("method") == method:
            out[float(labels["le"])] += value
    return list(out.items())


@dataclass(frozen=True)
class MethodView:
    method: str
    calls: int
    calls_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class ServerView:
    seconds: float
    methods: tuple[MethodView, ...]
    p50_ms: float  # over every method
    p99_ms: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    inference_mean_ms: float
    inference_p99_ms: float
    images_per_batch: float
    requests_per_batch: float

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.methods)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _mean(before: Scrape, after: Scrape, name: str) -> float:
    count = sum(_delta(before, after, f"{name}_count").values())
    total = sum(_delta(before, after, f"{name}_sum").values())
    return total / count if count > 0 else math.nan


def window(before: Scrape, after: Scrape, seconds: float) -> ServerView:
    """What the server did between two scrapes `seconds` apart."""
    calls: dict[str, float] = defaultdict(float)
    for key, value in _delta(before, after, "mnist_requests_total").items():
        calls[dict(key).get("method", "")] += value
    latency = _delta(before, after, "mnist_request_latency_seconds_bucket")
    methods = []
    for method, count in sorted(calls.items()):
        if count <= 0 or "/metrics" in method:
            continue
        quantile = lambda q, m=method: 1000 * histogram_quantile(q, _buckets(latency, m))  # noqa: E731
        methods.append(
            MethodView(
                method,
                int(count),
                count / seconds if seconds else 0.0,
                quantile(0.50),
                quantile(0.95),
                quantile(0.99),
            )
        )
    wait = _buckets(_delta(before, after, "mnist_queue_wait_seconds_bucket"))
    run = _buckets(_delta(before, after, "mnist_inference_seconds_bucket"))
    every = _buckets(
        {k: v for k, v in latency.items() if "/metrics" not in dict(k).get("method", "")}
    )
    return ServerView(
        seconds,
        tuple(methods),
        1000 * histogram_quantile(0.5, every),
        1000 * histogram_quantile(0.99, every),
        1000 * histogram_quantile(0.5, wait),
        1000 * histogram_quantile(0.99, wait),
        1000 * _mean(before, after, "mnist_inference_seconds"),
        1000 * histogram_quantile(0.99, run),
        _mean(before, after, "mnist_batch_size"),
        _mean(before, after, "mnist_batch_requests"),
    )


def format_view(view: ServerView) -> str:
    """The server's side as a table, one row per method, then the batching figures."""
    header = (
        f"{'method (server side)':<34} {'calls':>8} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7}"
    )
    lines = [header, "-" * len(header)]
    for m in view.methods:
        lines.append(
            f"{m.method[:34]:<34} {m.calls:>8} {m.calls_per_s:>8.1f} {m.p50_ms:>7.2f} "
            f"{m.p95_ms:>7.2f} {m.p99_ms:>7.2f}"
        )
    lines.append(
        f"{'all':<34} {view.calls:>8} {view.calls_per_s:>8.1f} {view.p50_ms:>7.2f} "
        f"{'':>7} {view.p99_ms:>7.2f}"
    )
    lines.append(
        f"queue wait p50 {view.queue_wait_p50_ms:.2f} ms, p99 {view.queue_wait_p99_ms:.2f} ms; "
        f"onnxruntime per batch mean {view.inference_mean_ms:.2f} ms, p99 "
        f"{view.inference_p99_ms:.2f} ms; {view.images_per_batch:.1f} images and "
        f"{view.requests_per_batch:.2f} requests per batch"
    )
    return "\n".join(lines)


def latency_share(view: ServerView, client_p50_ms: float) -> str:
    """How much of the client's median latency the server accounts for."""
    if not client_p50_ms or math.isnan(view.p50_ms):
        return ""
    return (
        f"of Locust's p50 of {client_p50_ms:.0f} ms, the server accounts for {view.p50_ms:.2f} ms "
        f"({100 * view.p50_ms / client_p50_ms:.0f} %); the rest is Locust and the way to it"
    )
