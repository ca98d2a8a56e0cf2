"""Server configuration: one typed frozen dataclass and the checks it must pass.

`load_config` fills it from the command line and the MNIST_SERVE_* variables (the parser is
in serving/flags.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

ENV_PREFIX = "MNIST_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    model_repository: Path = Path("model_repository")
    # The models to serve; () : every model in the repository (explicit mode: none until loaded).
    model_names: tuple[str, ...] = ()
    # serve exactly this version; None: each model's version_policy
    model_version: int | None = None
    # none | poll | explicit (Triton's names); see README "Model lifecycle"
    model_control_mode: str = "poll"
    repository_poll_secs: float = 5.0
    host: str = "0.0.0.0"
    port: int = 8500
    metrics_port: int = 9100  # 0 turns the Prometheus endpoint off
    http_port: int = 8000  # KServe v2 REST and the drawing page; 0 turns HTTP off
    device: str = "auto"  # auto | cuda | cpu
    max_batch_size: int = 64
    max_queue_delay_us: int = 0  # extra wait allowed to fill a batch; 0 never delays a request
    # queued requests beyond which calls are shed with RESOURCE_EXHAUSTED
    max_queue_size: int = 1024
    # server processes sharing the port; 0: one per core on the CPU (serving.automatic)
    workers: int = 0
    # onnxruntime threads for large batches; 0: every core (inference.activity)
    intra_op_threads: int = 0
    multi_thread_min_batch: int = 16  # smaller batches run on a one-thread session (see runtime.py)
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    warmup_runs: int = 3
    # onnxruntime threads busy-wait between runs (faster only on idle cores)
    allow_spinning: bool = False
    # how long a thread may hold the GIL while another waits (Python's default: 5000)
    switch_interval_us: int = 200
    max_message_bytes: int = 16 * 1024 * 1024
    grace_period: float = 10.0
    # Close each client connection after this long (gRPC sends GOAWAY; the client reconnects, re-resolves
    # its target and so reaches replicas that started after it). 0: connections live for ever.
    max_connection_age: float = 0.0
    # calls in flight on an aged connection get this long to finish
    max_connection_age_grace: float = 10.0
    # Slow and stuck clients (docs/reliability.md): what bounds the connections they hold, in seconds.
    http_idle_timeout: float = 75.0  # REST: closed when no complete request head came for this long
    http_body_timeout: float = 30.0  # REST: 408 when the body is not in this long after its head
    grpc_handshake_timeout: float = 20.0  # gRPC: closed when no HTTP/2 preface + SETTINGS by then
    # gRPC: calls in flight per connection (HTTP/2 SETTINGS)
    grpc_max_concurrent_streams: int = 1000
    # gRPC: ping a connection with calls in flight after this quiet
    grpc_keepalive_time: float = 60.0
    # gRPC: and close it when the ping goes unanswered this long
    grpc_keepalive_timeout: float = 20.0
    # gRPC: GOAWAY to a connection with no call for this long
    grpc_max_connection_idle: float = 300.0
    # Hostile input (serving.inputs): decoded pixels per call, all encoded images together, read from
    # their headers before decoding (one 4096x4096 image, or 64 of 512x512); threads that decode them.
    max_decoded_pixels: int = 4096 * 4096
    decode_threads: int = 1  # per worker process (--workers): one keeps the other cores for serving
    # Transport security (serving.security): PEM files, re-read when they change; no cert: plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mTLS, clients must present a certificate signed by it
    # set: inference and model calls need "authorization: Bearer <token>"
    auth_token_file: Path | None = None
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
        for check in CHECKS:
            for ok, message in check(self):
                if not ok:
                    raise ValueError(message)

    def describe(self) -> str:
        return " ".join(f"{key}={value}" for key, value in asdict(self).items())


def load_config(
    argv: list[str] | None = None, environ: dict[str, str] | None = None
) -> ServeConfig:
    """The configuration the command line and the MNIST_SERVE_* variables give."""
    # Imported here: serving.flags reads its defaults from ServeConfig, defined above.
    from serving.flags import apply_environment, build_parser

    parser = build_parser()
    apply_environment(parser, environ)
    values = vars(parser.parse_args(argv))
    values.pop("_names_given", None)
    return ServeConfig(**values)


# --- validation: per topic, a list of (condition, the message when it does not hold) -----------

Checks = list[tuple[bool, str]]


def _model_checks(c: ServeConfig) -> Checks:
    return [
        (
            c.model_control_mode in ("none", "poll", "explicit"),
            "--model-control-mode must be none, poll or explicit",
        ),
        (c.repository_poll_secs > 0, "--repository-poll-secs must be positive"),
        (
            all(n and "/" not in n and not n.startswith(".") for n in c.model_names),
            "--model-name must name a folder of the repository",
        ),
    ]


def _runtime_checks(c: ServeConfig) -> Checks:
    return [
        (
            c.device in ("auto", "cuda", "cpu"),
            f"--device must be auto, cuda or cpu, not '{c.device}'",
        ),
        (
            c.graph_optimization in ("disable", "basic", "extended", "all"),
            "--graph-optimization must be disable, basic, extended or all",
        ),
        (c.max_batch_size >= 1, "--max-batch-size must be at least 1"),
        (c.max_queue_delay_us >= 0, "--max-queue-delay-us cannot be negative"),
        (c.max_queue_size >= 1, "--max-queue-size must be at least 1"),
        (
            c.intra_op_threads >= 0 and c.inter_op_threads >= 0,
            "thread counts cannot be negative",
        ),
        (c.workers >= 0, "--workers cannot be negative (0: one per core)"),
        (c.multi_thread_min_batch >= 1, "--multi-thread-min-batch must be at least 1"),
        (c.switch_interval_us >= 1, "--switch-interval-us must be at least 1"),
    ]


def _connection_checks(c: ServeConfig) -> Checks:
    timeouts = (
        c.http_idle_timeout,
        c.http_body_timeout,
        c.grpc_handshake_timeout,
        c.grpc_keepalive_time,
        c.grpc_keepalive_timeout,
        c.grpc_max_connection_idle,
    )
    return [
        (
            0 < c.port < 65536 and 0 <= c.metrics_port < 65536 and 0 <= c.http_port < 65536,
            "ports must be in 1..65535",
        ),
        (c.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
        (c.grace_period >= 0, "--grace-period cannot be negative"),
        (
            c.max_connection_age >= 0 and c.max_connection_age_grace >= 0,
            "--max-connection-age and --max-connection-age-grace cannot be negative",
        ),
        (
            min(timeouts) > 0,
            "--http-idle-timeout, --http-body-timeout and the --grpc-* timeouts must be above 0",
        ),
        (
            c.grpc_max_concurrent_streams >= 1,
            "--grpc-max-concurrent-streams must be at least 1",
        ),
    ]


def _input_and_security_checks(c: ServeConfig) -> Checks:
    return [
        (
            c.max_decoded_pixels >= 784,
            "--max-decoded-pixels must be at least 784 (one 28x28 image)",
        ),
        (c.decode_threads >= 1, "--decode-threads must be at least 1"),
        ((c.tls_cert is None) == (c.tls_key is None), "--tls-cert and --tls-key go together"),
        (
            c.tls_client_ca is None or c.tls_cert is not None,
            "--tls-client-ca (mTLS) needs --tls-cert and --tls-key",
        ),
    ]


def _observability_checks(c: ServeConfig) -> Checks:
    return [
        (
            c.trace_mode in ("auto", "off", "opentelemetry"),
            "--trace-mode must be auto, off or opentelemetry",
        ),
        (
            c.trace_sample_ratio is None or 0 <= c.trace_sample_ratio <= 1,
            "--trace-sample-ratio must be in [0, 1]",
        ),
        (c.log_format in ("text", "json"), "--log-format must be text or json"),
        (0 < c.payload_log_sample_rate <= 1, "--payload-log-sample-rate must be in (0, 1]"),
        (c.payload_log_queue_size >= 1, "--payload-log-queue-size must be at least 1"),
    ]


# In the order they run: the first that fails is the error a user sees.
CHECKS = (
    _model_checks,
    _runtime_checks,
    _connection_checks,
    _input_and_security_checks,
    _observability_checks,
)
