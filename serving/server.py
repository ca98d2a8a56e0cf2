"""The server: wires repository → runtime → batcher → gRPC APIs, and owns start, readiness, drain and stop.

`Server` holds one readiness state; grpc.health.v1 and KServe's ServerReady/ModelReady are
read from it, so they can never disagree: NOT_SERVING while it loads and warms up, SERVING
once warm, NOT_SERVING again from the moment it drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import draining, metrics, payload_log, security
from serving.config import ServeConfig
from serving.connection_limits import slow_client_limits
from serving.generated import (
    grpc_predict_v2_pb2,
    grpc_predict_v2_pb2_grpc,
    mnist_classifier_pb2,
    mnist_classifier_pb2_grpc,
)
from serving.grpc_api import security as grpc_security
from serving.grpc_api.classifier import ClassifierServicer
from serving.grpc_api.handlers import WrappingRegistrar, server_wrap
from serving.grpc_api.kserve import KServeServicer
from serving.http_api import security as http_security
from serving.http_api.app import HttpServer, build_app
from serving.inference.poller import RepositoryPoller
from serving.inference.registry import ModelRegistry, RegistryOptions
from serving.inference.runtime import RuntimeOptions
from serving.inputs.framing import set_pillow_limit
from serving.inputs.pool import DecodePool
from serving.memory import keep_large_blocks_mmapped, start_trimmer
from serving.ports import PortInUse, ensure_ports_free, serve_metrics_or_refuse

log = logging.getLogger("mnist-serve")

SERVICE_NAMES = (
    mnist_classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)

# After the queue is done, how long predictions are still refused by the app before gRPC stops:
# time for every caller that is still sending to meet a refusal and wait out its pushback
# (serving.draining). 0.2 s lost calls on a loaded machine (event loops a few hundred ms late).
REFUSAL_WINDOW = 0.5


class Readiness(enum.Enum):
    STARTING = "starting"  # loading and warming up the model: NOT_SERVING
    SERVING = "serving"
    DRAINING = "draining"  # NOT_SERVING: new predictions refused, accepted ones finishing
    STOPPED = "stopped"


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # A second server on a taken port must fail, not share it; --workers share it on purpose
        # (serving.supervisor checks the port once, before starting them).
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        *slow_client_limits(config),  # serving.connection_limits: what bounds stalled connections
    ]
    if config.max_connection_age > 0:
        # gRPC adds +-10 % jitter to the age, so a client's connections to several replicas do not all
        # close at once; the client re-resolves its target and connects again, to new replicas too.
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace * 1000)),
        ]
    return options


def payload_log_settings(config: ServeConfig) -> payload_log.PayloadLogSettings | None:
    if not config.payload_log:
        return None
    return payload_log.PayloadLogSettings(
        config.payload_log,
        config.payload_log_sample_rate,
        config.payload_log_pixels,
        config.payload_log_queue_size,
    )


def _tune_the_process(config: ServeConfig) -> None:
    # The inference thread needs the GIL back for a moment after every batch; under load the event
    # loop would otherwise keep it for up to 5 ms (Python's default), stalling the answers.
    sys.setswitchinterval(config.switch_interval_us / 1e6)
    keep_large_blocks_mmapped()  # large bad requests must not leave RSS high (serving.memory)
    start_trimmer()


@dataclasses.dataclass(frozen=True)
class PortSecurity:
    """What guards both ports: the TLS files (and gRPC's credentials from them), the token file."""

    tls: security.TlsFiles | None
    grpc_credentials: grpc.ServerCredentials | None
    token: security.TokenFile | None

    @classmethod
    def of(cls, config: ServeConfig) -> PortSecurity:
        """Read the files now, so that a bad one fails the start-up before anything loads."""
        tls = (
            security.TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert and config.tls_key
            else None
        )
        credentials = grpc_security.server_credentials(tls) if tls else None
        token = security.TokenFile(config.auth_token_file) if config.auth_token_file else None
        return cls(tls, credentials, token)


class Server:
    """mnist-serve in one object: `await start()`, then `await drain()` and `await stop()`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.readiness = Readiness.STARTING
        # models -> versions -> ServedModel: what every API looks a call's (model, version) up in
        self.registry: ModelRegistry | None = None
        self._poller: RepositoryPoller | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._decoder: DecodePool | None = None  # PNG/JPEG decoding off the event loop
        self._metrics_httpd = None
        self._http: HttpServer | None = None  # KServe v2 REST and the page, on this same event loop
        self._grace_deadline: float | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def is_ready(self) -> bool:
        return self.readiness is Readiness.SERVING

    async def start(self) -> None:
        """Load, check and warm up the models, bind the ports, then report SERVING (and poll, in poll mode)."""
        config = self.config
        log.info("configuration: %s", config.describe())
        _tune_the_process(config)
        # TLS files and token first: a bad file is one clear line before anything loads.
        guard = PortSecurity.of(config)
        set_pillow_limit(config.max_decoded_pixels)
        self.registry = ModelRegistry(
            registry_options(config), metrics.PrometheusLifecycleObserver()
        )
        # Every model passes its checks and warms up, or one clear error.
        await self.registry.start()
        # Ports are checked before gRPC binds, so a taken port is one clear line, not gRPC's own log;
        # with --workers, the parent checked them and the siblings hold them now.
        if config.workers <= 1:
            ensure_ports_free(config)
        if config.metrics_port:
            self._metrics_httpd = serve_metrics_or_refuse(metrics.serve_metrics, config)
        self._decoder = DecodePool(config.decode_threads, config.max_decoded_pixels)
        payload_log.install(payload_log_settings(config), metrics.count_payload_records)
        await self._start_grpc(guard)
        if config.http_port:
            await self._start_http(guard)
        await self._set_readiness(Readiness.SERVING)
        if config.model_control_mode == "poll":
            self._poller = RepositoryPoller(self.registry, config.repository_poll_secs)
            self._poller.start()
        self._log_serving()

    def _grpc_server(self, guard: PortSecurity) -> grpc.aio.Server:
        """The gRPC server with every service registered, each method wrapped once."""
        server = grpc.aio.server(options=channel_options(self.config))
        # metrics, errors, token: once per method
        services = WrappingRegistrar(server, server_wrap(guard.token))
        mnist_classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(self.registry, self._decoder), services
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.registry, self.is_ready), services
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, services)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), services
        )
        return server

    async def _start_grpc(self, guard: PortSecurity) -> None:
        self._grpc = self._grpc_server(guard)
        await self._set_readiness(Readiness.STARTING)
        try:
            if guard.grpc_credentials is not None:
                self._grpc.add_secure_port(self.address, guard.grpc_credentials)
            else:
                self._grpc.add_insecure_port(self.address)
        except RuntimeError as err:
            raise PortInUse(
                f"cannot listen on {self.address} ({err}); is another server running? choose --port"
            ) from err
        await self._grpc.start()

    async def _start_http(self, guard: PortSecurity) -> None:
        """KServe v2 REST and the page, on this same event loop."""
        config = self.config
        app = build_app(self.registry, self.is_ready, config.max_message_bytes)
        if guard.token is not None:  # inside the error answers
            app.middlewares.append(http_security.token_middleware(guard.token))
        self._http = HttpServer(
            app,
            config.host,
            config.http_port,
            config.grace_period,
            http_security.ssl_context(guard.tls) if guard.tls else None,
            reuse_port=config.workers > 1,
            idle_timeout=config.http_idle_timeout,
            body_timeout=config.http_body_timeout,
        )
        await self._http.start()

    def _log_serving(self) -> None:
        config = self.config
        served = (
            ", ".join(f"{m.name} {m.version_label}" for m in self.registry.served()) or "none yet"
        )
        log.info(
            "serving %s (model control %s) on %s; HTTP on :%s; metrics on :%s; event loop %s",
            served,
            config.model_control_mode,
            self.address,
            config.http_port or "off",
            config.metrics_port or "off",
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    async def drain(self) -> None:
        """NOT_SERVING, refuse new predictions, finish accepted ones (within --grace-period).

        The batcher closes first: it refuses new work with a clear status (UNAVAILABLE) while it
        finishes what is queued, and callers in mid-call meet that refusal rather than a
        connection being torn down. stop() then stops gRPC with what is left of the grace period.
        """
        loop = asyncio.get_running_loop()
        self._grace_deadline = loop.time() + self.config.grace_period
        log.info(
            "draining: NOT_SERVING, refusing new calls, finishing accepted ones (grace %.1f s)",
            self.config.grace_period,
        )
        await self._set_readiness(Readiness.DRAINING)
        draining.plan_stop(
            time.monotonic() + REFUSAL_WINDOW
        )  # refusals from now on say when to retry
        if self._poller is not None:
            await self._poller.stop()  # no version comes or goes while draining
        if self.registry is not None:
            try:
                await asyncio.wait_for(self.registry.close(), timeout=self._grace_left())
            except asyncio.TimeoutError:
                log.warning("grace period over with calls still queued: they are cancelled")
        window = min(REFUSAL_WINDOW, self._grace_left())
        draining.plan_stop(time.monotonic() + window)
        await asyncio.sleep(window)

    async def stop(self) -> None:
        """Stop gRPC (calls still running get what is left of the grace period) and the metrics endpoint."""
        if self._grace_deadline is None:  # stopped without draining: the whole grace period
            self._grace_deadline = asyncio.get_running_loop().time() + self.config.grace_period
        # Both ports close at once: the refused callers were told to come back after this moment.
        await asyncio.gather(
            *([self._grpc.stop(self._grace_left())] if self._grpc is not None else []),
            *([self._http.stop()] if self._http is not None else []),
        )
        if self._decoder is not None:
            self._decoder.close()
        payload_log.uninstall()  # what is queued is written first (a few seconds at most)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self.readiness = Readiness.STOPPED
        log.info("stopped")

    def _grace_left(self) -> float:
        return max(0.0, (self._grace_deadline or 0.0) - asyncio.get_running_loop().time())

    async def _set_readiness(self, readiness: Readiness) -> None:
        """The one place readiness changes; grpc.health follows it for the server and each API."""
        self.readiness = readiness
        if readiness is Readiness.DRAINING:
            await self._health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if readiness is Readiness.SERVING
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)


def registry_options(config: ServeConfig) -> RegistryOptions:
    return RegistryOptions(
        repository=config.model_repository,
        model_names=config.model_names,
        pinned_version=config.model_version,
        control_mode=config.model_control_mode,
        max_batch_size=config.max_batch_size,
        max_queue_delay=config.max_queue_delay_us / 1e6,
        max_queue_size=config.max_queue_size,
        runtime=RuntimeOptions(
            device=config.device,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            graph_optimization=config.graph_optimization,
            warmup_runs=config.warmup_runs,
            max_batch_size=config.max_batch_size,
            allow_spinning=config.allow_spinning,
            multi_thread_min_batch=config.multi_thread_min_batch,
        ),
    )


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set, from the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(config: ServeConfig, stop: asyncio.Event | None = None) -> int:
    """`mnist-serve`: run until SIGTERM/SIGINT (or `stop`), then drain and stop.

    A lone server listens for the signals once it serves; a worker (serving.worker) passes the
    `stop` it listened on before its model loaded.
    """
    server = Server(config)
    await server.start()
    if stop is None:
        stop = stop_on_signals()
    await stop.wait()
    await server.drain()
    await server.stop()
    return 0
