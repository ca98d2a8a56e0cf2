"""Server configuration: one typed dataclass, filled from flags, each also an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_PREFIX = "MNIST_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    model_repository: Path = Path("model_repository")
    # The models to serve; () : every model in the repository (explicit mode: none until loaded).
    model_names: tuple[str, ...] = ()
    model_version: int | None = (
        None  # serve exactly this version; None: each model's version_policy
    )
    model_control_mode: str = (
        "poll"  # none | poll | explicit (Triton's names); see README "Model lifecycle"
    )
    repository_poll_secs: float = 5.0
    host: str = "0.0.0.0"
    port: int = 8500
    metrics_port: int = 9100  # 0 turns the Prometheus endpoint off
    http_port: int = 8000  # KServe v2 REST and the drawing page; 0 turns HTTP off
    device: str = "auto"  # auto | cuda | cpu
    max_batch_size: int = 64
    max_queue_delay_us: int = 0  # extra wait allowed to fill a batch; 0 never delays a request
    max_queue_size: int = (
        1024  # queued requests beyond which calls are shed with RESOURCE_EXHAUSTED
    )
    workers: int = (
        0  # server processes sharing the port; 0: one per core on the CPU (serving.workers.resolve)
    )
    intra_op_threads: int = (
        0  # onnxruntime threads for large batches; 0: every core (inference.activity)
    )
    multi_thread_min_batch: int = 16  # smaller batches run on a one-thread session (see runtime.py)
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    warmup_runs: int = 3
    allow_spinning: bool = (
        False  # onnxruntime threads busy-wait between runs (faster only on idle cores)
    )
    switch_interval_us: int = (
        200  # how long a thread may hold the GIL while another waits (Python's default: 5000)
    )
    max_message_bytes: int = 16 * 1024 * 1024
    grace_period: float = 10.0
    # Close each client connection after this long (gRPC sends GOAWAY; the client reconnects, re-resolves
    # its target and so reaches replicas that started after it). 0: connections live for ever.
    max_connection_age: float = 0.0
    max_connection_age_grace: float = (
        10.0  # calls in flight on an aged connection get this long to finish
    )
    # Slow and stuck clients (docs/reliability.md): what bounds the connections they hold, in seconds.
    http_idle_timeout: float = 75.0  # REST: closed when no complete request head came for this long
    http_body_timeout: float = 30.0  # REST: 408 when the body is not in this long after its head
    grpc_handshake_timeout: float = 20.0  # gRPC: closed when no HTTP/2 preface + SETTINGS by then
    grpc_max_concurrent_streams: int = (
        1000  # gRPC: calls in flight per connection (HTTP/2 SETTINGS)
    )
    grpc_keepalive_time: float = (
        60.0  # gRPC: ping a connection with calls in flight after this quiet
    )
    grpc_keepalive_timeout: float = (
        20.0  # gRPC: and close it when the ping goes unanswered this long
    )
    grpc_max_connection_idle: float = (
        300.0  # gRPC: GOAWAY to a connection with no call for this long
    )
    # Hostile input (serving.inputs): decoded pixels per call, all encoded images together, read from
    # their headers before decoding (one 4096x4096 image, or 64 of 512x512); threads that decode them.
    max_decoded_pixels: int = 4096 * 4096
    decode_threads: int = 1  # per worker process (--workers): one keeps the other cores for serving
    # Transport security (serving.security): PEM files, re-read when they change; no cert: plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mTLS, clients must present a certificate signed by it
    auth_token_file: Path | None = (
        None  # set: inference and model calls need "authorization: Bearer <token>"
    )
    # OpenTelemetry tracing (serving.tracing); the OTEL_* variables set the rest. auto: on when
    # OTEL_TRACES_EXPORTER names an exporter. No endpoint / ratio: the OTEL_* value or the SDK's.
    trace_mode: str = "auto"  # auto | off | opentelemetry
    trace_endpoint: str = ""
    trace_sample_ratio: float | None = None
    log_format: str = "text"  # text | json (serving.log_setup)
    log_level: str = "info"
    # Sampled payload logging (serving.payload_log): a JSON-lines file or an http(s):// CloudEvents
    # endpoint; "" turns it off.
    payload_log: str = ""
    payload_log_sample_rate: float = 1.0
    payload_log_pixels: bool = False
    payload_log_queue_size: int = 1024

    @property
    def model_name(self) -> str:
        """The first model named (the one an empty model name means), or "" when all are served."""
        return self.model_names[0] if self.model_names else ""

    def __post_init__(self) -> None:
        if isinstance(self.model_names, str):  # from MNIST_SERVE_MODEL_NAMES=a,b
            object.__setattr__(
                self, "model_names", tuple(n for n in self.model_names.split(",") if n)
            )
        object.__setattr__(self, "model_names", tuple(self.model_names))
        checks = [
            (
                self.model_control_mode in ("none", "poll", "explicit"),
                "--model-control-mode must be none, poll or explicit",
            ),
            (self.repository_poll_secs > 0, "--repository-poll-secs must be positive"),
            (
                all(n and "/" not in n and not n.startswith(".") for n in self.model_names),
                "--model-name must name a folder of the repository",
            ),
            (
                self.device in ("auto", "cuda", "cpu"),
                f"--device must be auto, cuda or cpu, not '{self.device}'",
            ),
            (
                self.graph_optimization in ("disable", "basic", "extended", "all"),
                "--graph-optimization must be disable, basic, extended or all",
            ),
            (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
            (self.max_queue_delay_us >= 0, "--max-queue-delay-us cannot be negative"),
            (self.max_queue_size >= 1, "--max-queue-size must be at least 1"),
            (
                self.intra_op_threads >= 0 and self.inter_op_threads >= 0,
                "thread counts cannot be negative",
            ),
            (self.workers >= 0, "--workers cannot be negative (0: one per core)"),
            (self.multi_thread_min_batch >= 1, "--multi-thread-min-batch must be at least 1"),
            (
                0 < self.port < 65536
                and 0 <= self.metrics_port < 65536
                and 0 <= self.http_port < 65536,
                "ports must be in 1..65535",
            ),
            (self.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
            (self.grace_period >= 0, "--grace-period cannot be negative"),
            (
                self.max_connection_age >= 0 and self.max_connection_age_grace >= 0,
                "--max-connection-age and --max-connection-age-grace cannot be negative",
            ),
            (
                min(
                    self.http_idle_timeout,
                    self.http_body_timeout,
                    self.grpc_handshake_timeout,
                    self.grpc_keepalive_time,
                    self.grpc_keepalive_timeout,
                    self.grpc_max_connection_idle,
                )
                > 0,
                "--http-idle-timeout, --http-body-timeout and the --grpc-* timeouts must be above 0",
            ),
            (
                self.grpc_max_concurrent_streams >= 1,
                "--grpc-max-concurrent-streams must be at least 1",
            ),
            (self.switch_interval_us >= 1, "--switch-interval-us must be at least 1"),
            (
                self.max_decoded_pixels >= 784,
                "--max-decoded-pixels must be at least 784 (one 28x28 image)",
            ),
            (self.decode_threads >= 1, "--decode-threads must be at least 1"),
            (
                (self.tls_cert is None) == (self.tls_key is None),
                "--tls-cert and --tls-key go together",
            ),
            (
                self.tls_client_ca is None or self.tls_cert is not None,
                "--tls-client-ca (mTLS) needs --tls-cert and --tls-key",
            ),
            (
                self.trace_mode in ("auto", "off", "opentelemetry"),
                "--trace-mode must be auto, off or opentelemetry",
            ),
            (
                self.trace_sample_ratio is None or 0 <= self.trace_sample_ratio <= 1,
                "--trace-sample-ratio must be in [0, 1]",
            ),
            (self.log_format in ("text", "json"), "--log-format must be text or json"),
            (0 < self.payload_log_sample_rate <= 1, "--payload-log-sample-rate must be in (0, 1]"),
            (self.payload_log_queue_size >= 1, "--payload-log-queue-size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def describe(self) -> str:
        return " ".join(f"{key}={value}" for key, value in asdict(self).items())


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST CNN over gRPC (mnist.v1.Classifier and KServe v2 "
        "inference.GRPCInferenceService) with dynamic batching on onnxruntime. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>, "
        f"e.g. {ENV_PREFIX}MAX_BATCH_SIZE=32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = ServeConfig()
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-repository",
        type=Path,
        default=d.model_repository,
        help="the Triton-style model repository to serve from; each version's sha256 is checked "
        "against its metadata.json",
    )
    model.add_argument(
        "--model-name",
        dest="model_names",
        action=_AppendNames,
        default=d.model_names,
        help="a model to serve (repeatable); default: every model in the repository "
        "(with --model-control-mode explicit: the models loaded at start)",
    )
    model.add_argument(
        "--model-version",
        type=int,
        default=d.model_version,
        help="serve exactly this version of each model; default: each model's version_policy "
        "in config.pbtxt (Triton's default: the newest)",
    )
    model.add_argument(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        default=d.model_control_mode,
        help="none: load at start only; poll: pick up new, changed and removed versions while "
        "serving; explicit: load and unload through Triton's RepositoryModelLoad/Unload",
    )
    model.add_argument(
        "--repository-poll-secs",
        type=float,
        default=d.repository_poll_secs,
        help="seconds between two looks at the repository in poll mode",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="address the server's ports bind to")
    net.add_argument(
        "--port",
        type=int,
        default=d.port,
        help="the gRPC port (both gRPC APIs, health, reflection)",
    )
    net.add_argument(
        "--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics; 0: off"
    )
    net.add_argument(
        "--http-port",
        type=int,
        default=d.http_port,
        help="KServe v2 REST and the drawing page at /; 0: off",
    )
    net.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="larger requests get RESOURCE_EXHAUSTED (gRPC) / 413 (REST)",
    )
    net.add_argument(
        "--grace-period",
        type=float,
        default=d.grace_period,
        help="seconds to finish accepted calls after SIGTERM/SIGINT",
    )
    net.add_argument(
        "--max-connection-age",
        type=float,
        default=d.max_connection_age,
        help="seconds after which a client connection is closed (GOAWAY), so clients reconnect "
        "and reach replicas started after them; 0: never",
    )
    net.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=d.max_connection_age_grace,
        help="seconds that calls in flight on a connection past its age get to finish",
    )
    slow = parser.add_argument_group("slow and stuck clients (what bounds their connections)")
    slow.add_argument(
        "--http-idle-timeout",
        type=float,
        default=d.http_idle_timeout,
        help="REST: close a connection that sent no complete request head for this many "
        "seconds, since it connected or since its last answer (slow headers, idle)",
    )
    slow.add_argument(
        "--http-body-timeout",
        type=float,
        default=d.http_body_timeout,
        help="REST: answer 408 and close when a request's body has not fully arrived this "
        "many seconds after its head",
    )
    slow.add_argument(
        "--grpc-handshake-timeout",
        type=float,
        default=d.grpc_handshake_timeout,
        help="gRPC: close a connection that has not sent its HTTP/2 preface and SETTINGS "
        "(and TLS handshake) within this many seconds",
    )
    slow.add_argument(
        "--grpc-max-concurrent-streams",
        type=int,
        default=d.grpc_max_concurrent_streams,
        help="gRPC: calls in flight per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)",
    )
    slow.add_argument(
        "--grpc-keepalive-time",
        type=float,
        default=d.grpc_keepalive_time,
        help="gRPC: seconds of quiet after which a connection is pinged",
    )
    slow.add_argument(
        "--grpc-keepalive-timeout",
        type=float,
        default=d.grpc_keepalive_timeout,
        help="gRPC: close a connection whose ping is not answered within this many seconds "
        "(a client that stopped reading)",
    )
    slow.add_argument(
        "--grpc-max-connection-idle",
        type=float,
        default=d.grpc_max_connection_idle,
        help="gRPC: send GOAWAY to a connection with no call in flight for this many seconds",
    )
    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size",
        type=int,
        default=d.max_batch_size,
        help="most images per onnxruntime call (and per request)",
    )
    batching.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=d.max_queue_delay_us,
        help="longest extra wait to fill a batch; 0: never wait (a lone request runs at once)",
    )
    batching.add_argument(
        "--max-queue-size",
        type=int,
        default=d.max_queue_size,
        help="queued requests beyond which new calls get RESOURCE_EXHAUSTED",
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default=d.device,
        help="auto: CUDA when its provider initialises, else CPU, with one log line saying which "
        "and why; cuda without a usable GPU stops with a clear error",
    )
    runtime.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="server processes sharing the gRPC port (SO_REUSEPORT), each with its own event "
        "loop, batcher and onnxruntime session; 0: one per core (one with a GPU)",
    )
    runtime.add_argument(
        "--intra-op-threads",
        type=int,
        default=d.intra_op_threads,
        help="onnxruntime threads for a large batch, per worker, used while the other "
        "workers idle (else one); 0: every core. 1 on a machine shared with other "
        "CPU-heavy work, where a two-thread run waits for its descheduled thread",
    )
    runtime.add_argument(
        "--multi-thread-min-batch",
        type=int,
        default=d.multi_thread_min_batch,
        help="batches of at least this many images use the --intra-op-threads session; smaller "
        "ones a one-thread session (waking threads costs more than they save on them)",
    )
    runtime.add_argument(
        "--inter-op-threads",
        type=int,
        default=d.inter_op_threads,
        help="onnxruntime inter-op threads, per worker",
    )
    runtime.add_argument(
        "--graph-optimization",
        choices=["disable", "basic", "extended", "all"],
        default=d.graph_optimization,
        help="onnxruntime's graph optimisation level",
    )
    runtime.add_argument(
        "--warmup-runs",
        type=int,
        default=d.warmup_runs,
        help="warm-up runs of each version before it takes traffic (and the server reports SERVING)",
    )
    runtime.add_argument(
        "--allow-spinning",
        type=_boolean,
        default=d.allow_spinning,
        help="let idle onnxruntime threads busy-wait (true/false)",
    )
    runtime.add_argument(
        "--switch-interval-us",
        type=int,
        default=d.switch_interval_us,
        help="Python's GIL switch interval: short lets the inference thread hand results back "
        "without waiting out the event loop (Python's default is 5000)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-decoded-pixels",
        type=int,
        default=d.max_decoded_pixels,
        help="pixels the encoded images of one call may decode to, all together, checked from "
        "their headers before decoding (also Pillow's decompression-bomb limit)",
    )
    limits.add_argument(
        "--decode-threads",
        type=int,
        default=d.decode_threads,
        help="threads that decode PNG/JPEG images off the event loop",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls-cert",
        type=Path,
        default=d.tls_cert,
        help="PEM certificate (chain) of the server: TLS on the gRPC and HTTP ports; "
        "re-read when the file changes",
    )
    security.add_argument(
        "--tls-key", type=Path, default=d.tls_key, help="PEM private key of --tls-cert"
    )
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        default=d.tls_client_ca,
        help="PEM CA bundle: mutual TLS, every client must present a certificate it signed",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        default=d.auth_token_file,
        help="file holding a bearer token that inference and model calls must carry "
        "(authorization: Bearer <token>); health and metrics stay open",
    )
    payload = parser.add_argument_group("payload logging")
    payload.add_argument(
        "--payload-log",
        default=d.payload_log,
        help="record sampled calls (request id, model, version, input shape and sha256, "
        "predicted class and probabilities, latency, status) to this JSON-lines file, "
        "or POST them as CloudEvents to this http(s):// URL; empty: off",
    )
    payload.add_argument(
        "--payload-log-sample-rate",
        type=float,
        default=d.payload_log_sample_rate,
        help="share of calls recorded, in (0, 1]",
    )
    payload.add_argument(
        "--payload-log-pixels",
        type=_boolean,
        default=d.payload_log_pixels,
        help="also record each input's 8-bit pixels (base64; true/false)",
    )
    payload.add_argument(
        "--payload-log-queue-size",
        type=int,
        default=d.payload_log_queue_size,
        help="records waiting for the sink, beyond which records (never calls) are dropped "
        'and counted in mnist_payload_log_records_total{outcome="dropped"}',
    )
    tracing = parser.add_argument_group(
        "tracing (OpenTelemetry; the OTEL_* variables set the rest: see docs/tracing.md)"
    )
    tracing.add_argument(
        "--trace-mode",
        choices=["auto", "off", "opentelemetry"],
        default=d.trace_mode,
        help="opentelemetry: export spans by OTLP (Triton's mode name); auto: only "
        "when OTEL_TRACES_EXPORTER names an exporter (otlp, console); off: never",
    )
    tracing.add_argument(
        "--trace-endpoint",
        default=d.trace_endpoint,
        help="the OTLP receiver, e.g. http://collector:4317 (gRPC) or "
        "http://collector:4318/v1/traces (with OTEL_EXPORTER_OTLP_PROTOCOL="
        "http/protobuf); default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else "
        "localhost:4317",
    )
    tracing.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=d.trace_sample_ratio,
        help="share of traces started here that are recorded, in [0, 1]; a "
        "caller's sampled traceparent is followed (parentbased_traceidratio); "
        "default: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else every call",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=d.log_format,
        help="text for people; json: one object a line (time, level, logger, "
        "message, worker, pid, trace_id and span_id when tracing is on) for "
        "log collectors",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=d.log_level,
        help="the effective configuration is logged once at start, at info",
    )
    return parser


def apply_environment(
    parser: argparse.ArgumentParser, environ: dict[str, str] | None = None
) -> None:
    """Let MNIST_SERVE_<FLAG> set each flag's default; the command line still wins."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse converts string defaults with the action's type
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value not in (None, "") and action.dest != "help":
            if action.choices and value not in action.choices:
                raise ValueError(
                    f"{ENV_PREFIX}{action.dest.upper()}={value}: choose one of {', '.join(action.choices)}"
                )
            action.default = value


def load_config(
    argv: list[str] | None = None, environ: dict[str, str] | None = None
) -> ServeConfig:
    parser = build_parser()
    apply_environment(parser, environ)
    values = vars(parser.parse_args(argv))
    values.pop("_names_given", None)
    return ServeConfig(**values)
