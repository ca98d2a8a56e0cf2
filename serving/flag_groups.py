"""The flags of `mnist-serve`, one function per `--help` group; every default is the
ServeConfig field the flag sets (serving/flags.py assembles them into the parser)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from serving.config import ServeConfig


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not '{text}'")


class _AppendNames(argparse.Action):
    """A repeatable flag whose default (e.g. from the environment) is replaced, not appended to."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(namespace, "_names_given", False)
        names = list(getattr(namespace, self.dest)) if given else []
        setattr(namespace, self.dest, [*names, values])
        namespace._names_given = True


def _adder(
    group: argparse._ArgumentGroup | argparse.ArgumentParser, d: ServeConfig
) -> Callable[..., None]:
    """`group.add_argument`, with each flag's default read from the ServeConfig field it sets."""

    def add(flag: str, **kwargs) -> None:
        dest = kwargs.get("dest", flag.removeprefix("--").replace("-", "_"))
        group.add_argument(flag, default=getattr(d, dest), **kwargs)

    return add


def add_model_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """The models to serve and how the repository is watched."""
    model = parser.add_argument_group("model")
    add = _adder(model, d)
    add(
        "--model-repository",
        type=Path,
        help="the Triton-style model repository to serve from; each version's sha256 is checked "
        "against its metadata.json",
    )
    add(
        "--model-name",
        dest="model_names",
        action=_AppendNames,
        help="a model to serve (repeatable); default: every model in the repository "
        "(with --model-control-mode explicit: the models loaded at start)",
    )
    add(
        "--model-version",
        type=int,
        help="serve exactly this version of each model; default: each model's version_policy "
        "in config.pbtxt (Triton's default: the newest)",
    )
    add(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        help="none: load at start only; poll: pick up new, changed and removed versions while "
        "serving; explicit: load and unload through Triton's RepositoryModelLoad/Unload",
    )
    add(
        "--repository-poll-secs",
        type=float,
        help="seconds between two looks at the repository in poll mode",
    )


def add_network_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """Ports, message size, shutdown and connection age."""
    net = parser.add_argument_group("network")
    add = _adder(net, d)
    add("--host", help="address the server's ports bind to")
    add("--port", type=int, help="the gRPC port (both gRPC APIs, health, reflection)")
    add("--metrics-port", type=int, help="Prometheus /metrics; 0: off")
    add("--http-port", type=int, help="KServe v2 REST and the drawing page at /; 0: off")
    add(
        "--max-message-bytes",
        type=int,
        help="larger requests get RESOURCE_EXHAUSTED (gRPC) / 413 (REST)",
    )
    add("--grace-period", type=float, help="seconds to finish accepted calls after SIGTERM/SIGINT")
    add(
        "--max-connection-age",
        type=float,
        help="seconds after which a client connection is closed (GOAWAY), so clients reconnect "
        "and reach replicas started after them; 0: never",
    )
    add(
        "--max-connection-age-grace",
        type=float,
        help="seconds that calls in flight on a connection past its age get to finish",
    )


def add_slow_client_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """What bounds the connections of slow and stuck clients."""
    slow = parser.add_argument_group("slow and stuck clients (what bounds their connections)")
    add = _adder(slow, d)
    add(
        "--http-idle-timeout",
        type=float,
        help="REST: close a connection that sent no complete request head for this many "
        "seconds, since it connected or since its last answer (slow headers, idle)",
    )
    add(
        "--http-body-timeout",
        type=float,
        help="REST: answer 408 and close when a request's body has not fully arrived this "
        "many seconds after its head",
    )
    add(
        "--grpc-handshake-timeout",
        type=float,
        help="gRPC: close a connection that has not sent its HTTP/2 preface and SETTINGS "
        "(and TLS handshake) within this many seconds",
    )
    add(
        "--grpc-max-concurrent-streams",
        type=int,
        help="gRPC: calls in flight per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)",
    )
    add(
        "--grpc-keepalive-time",
        type=float,
        help="gRPC: seconds of quiet after which a connection is pinged",
    )
    add(
        "--grpc-keepalive-timeout",
        type=float,
        help="gRPC: close a connection whose ping is not answered within this many seconds "
        "(a client that stopped reading)",
    )
    add(
        "--grpc-max-connection-idle",
        type=float,
        help="gRPC: send GOAWAY to a connection with no call in flight for this many seconds",
    )


def add_batching_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """The dynamic batcher."""
    batching = parser.add_argument_group("batching")
    add = _adder(batching, d)
    add("--max-batch-size", type=int, help="most images per onnxruntime call (and per request)")
    add(
        "--max-queue-delay-us",
        type=int,
        help="longest extra wait to fill a batch; 0: never wait (a lone request runs at once)",
    )
    add(
        "--max-queue-size",
        type=int,
        help="queued requests beyond which new calls get RESOURCE_EXHAUSTED",
    )


def add_runtime_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """Device, worker processes, onnxruntime's sessions and the GIL."""
    runtime = parser.add_argument_group("runtime")
    add = _adder(runtime, d)
    add(
        "--device",
        choices=["auto", "cuda", "cpu"],
        help="auto: CUDA when its provider initialises, else CPU, with one log line saying which "
        "and why; cuda without a usable GPU stops with a clear error",
    )
    add(
        "--workers",
        type=int,
        help="server processes sharing the gRPC port (SO_REUSEPORT), each with its own event "
        "loop, batcher and onnxruntime session; 0: one per core (one with a GPU)",
    )
    add(
        "--intra-op-threads",
        type=int,
        help="onnxruntime threads for a large batch, per worker, used while the other "
        "workers idle (else one); 0: every core. 1 on a machine shared with other "
        "CPU-heavy work, where a two-thread run waits for its descheduled thread",
    )
    add(
        "--multi-thread-min-batch",
        type=int,
        help="batches of at least this many images use the --intra-op-threads session; smaller "
        "ones a one-thread session (waking threads costs more than they save on them)",
    )
    add("--inter-op-threads", type=int, help="onnxruntime inter-op threads, per worker")
    add(
        "--graph-optimization",
        choices=["disable", "basic", "extended", "all"],
        help="onnxruntime's graph optimisation level",
    )
    add(
        "--warmup-runs",
        type=int,
        help="warm-up runs of each version before it takes traffic (and the server reports SERVING)",
    )
    add(
        "--allow-spinning",
        type=_boolean,
        help="let idle onnxruntime threads busy-wait (true/false)",
    )
    add(
        "--switch-interval-us",
        type=int,
        help="Python's GIL switch interval: short lets the inference thread hand results back "
        "without waiting out the event loop (Python's default is 5000)",
    )


def add_limit_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """Hostile input: decoded pixels and the threads that decode."""
    limits = parser.add_argument_group("limits")
    add = _adder(limits, d)
    add(
        "--max-decoded-pixels",
        type=int,
        help="pixels the encoded images of one call may decode to, all together, checked from "
        "their headers before decoding (also Pillow's decompression-bomb limit)",
    )
    add("--decode-threads", type=int, help="threads that decode PNG/JPEG images off the event loop")


def add_security_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """TLS, mutual TLS and the bearer token."""
    security = parser.add_argument_group("security")
    add = _adder(security, d)
    add(
        "--tls-cert",
        type=Path,
        help="PEM certificate (chain) of the server: TLS on the gRPC and HTTP ports; "
        "re-read when the file changes",
    )
    add("--tls-key", type=Path, help="PEM private key of --tls-cert")
    add(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: mutual TLS, every client must present a certificate it signed",
    )
    add(
        "--auth-token-file",
        type=Path,
        help="file holding a bearer token that inference and model calls must carry "
        "(authorization: Bearer <token>); health and metrics stay open",
    )


def add_payload_log_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """Sampled payload logging."""
    payload = parser.add_argument_group("payload logging")
    add = _adder(payload, d)
    add(
        "--payload-log",
        help="record sampled calls (request id, model, version, input shape and sha256, "
        "predicted class and probabilities, latency, status) to this JSON-lines file, "
        "or POST them as CloudEvents to this http(s):// URL; empty: off",
    )
    add("--payload-log-sample-rate", type=float, help="share of calls recorded, in (0, 1]")
    add(
        "--payload-log-pixels",
        type=_boolean,
        help="also record each input's 8-bit pixels (base64; true/false)",
    )
    add(
        "--payload-log-queue-size",
        type=int,
        help="records waiting for the sink, beyond which records (never calls) are dropped "
        'and counted in mnist_payload_log_records_total{outcome="dropped"}',
    )


def add_tracing_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """OpenTelemetry tracing."""
    tracing = parser.add_argument_group(
        "tracing (OpenTelemetry; the OTEL_* variables set the rest: see docs/tracing.md)"
    )
    add = _adder(tracing, d)
    add(
        "--trace-mode",
        choices=["auto", "off", "opentelemetry"],
        help="opentelemetry: export spans by OTLP (Triton's mode name); auto: only "
        "when OTEL_TRACES_EXPORTER names an exporter (otlp, console); off: never",
    )
    add(
        "--trace-endpoint",
        help="the OTLP receiver, e.g. http://collector:4317 (gRPC) or "
        "http://collector:4318/v1/traces (with OTEL_EXPORTER_OTLP_PROTOCOL="
        "http/protobuf); default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else "
        "localhost:4317",
    )
    add(
        "--trace-sample-ratio",
        type=float,
        help="share of traces started here that are recorded, in [0, 1]; a "
        "caller's sampled traceparent is followed (parentbased_traceidratio); "
        "default: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else every call",
    )


def add_log_flags(parser: argparse.ArgumentParser, d: ServeConfig) -> None:
    """The server's own log (on the parser itself, as `--help` has always listed it)."""
    add = _adder(parser, d)
    add(
        "--log-format",
        choices=["text", "json"],
        help="text for people; json: one object a line (time, level, logger, "
        "message, worker, pid, trace_id and span_id when tracing is on) for "
        "log collectors",
    )
    add(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="the effective configuration is logged once at start, at info",
    )
