"""Server start-up and shutdown: wires repository → runtime → batcher → APIs, health and reflection."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import metrics
from serving.batcher import DynamicBatcher
from serving.classifier_api import ClassifierServicer
from serving.config import ServeConfig
from serving.generated import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from serving.generated import mnist_classifier_pb2, mnist_classifier_pb2_grpc
from serving.kserve_api import KServeServicer
from serving.repository import load_version
from serving.runtime import OnnxRuntimeSession, RuntimeOptions
from serving.served_model import ServedModel

log = logging.getLogger("mnist-serve")

SERVICE_NAMES = (
    mnist_classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


# After the queue is done, how long predictions are still refused by the app before gRPC stops.
REFUSAL_WINDOW = 0.2


class PortInUse(OSError):
    """A port the server needs is taken."""


def ensure_port_free(host: str, port: int, flag: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PortInUse(f"cannot listen on {host}:{port} ({err.strerror}); "
                            f"is another server running? choose another {flag}") from err


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ]


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new calls, finish accepted ones."""
    log.info("configuration: %s", config.describe())
    # The inference thread needs the GIL back for a moment after every batch; under load the event
    # loop would otherwise keep it for up to 5 ms (Python's default), stalling the answers.
    sys.setswitchinterval(config.switch_interval_us / 1e6)
    version = load_version(config.model_repository, config.model_name, config.model_version)
    sha = version.verify_checksum()
    runtime = OnnxRuntimeSession(str(version.model_path), RuntimeOptions(
        device=config.device, intra_op_threads=config.intra_op_threads, inter_op_threads=config.inter_op_threads,
        graph_optimization=config.graph_optimization, warmup_runs=config.warmup_runs,
        max_batch_size=config.max_batch_size, allow_spinning=config.allow_spinning,
    ))
    # Ports are checked before gRPC binds, so a taken port is one clear line, not gRPC's own log.
    address = f"{config.host}:{config.port}"
    ensure_port_free(config.host, config.port, "--port")
    if config.metrics_port:
        try:
            metrics.serve_metrics(config.metrics_port, config.host)
        except OSError as err:
            raise PortInUse(f"cannot serve metrics on {config.host}:{config.metrics_port} ({err.strerror}); "
                            f"choose another --metrics-port, or 0 to turn metrics off") from err
    batcher = DynamicBatcher(runtime.run, config.max_batch_size, config.max_queue_delay_us / 1e6,
                             config.max_queue_size, metrics.PrometheusBatchObserver())
    model = ServedModel(version, runtime.provider, config.max_batch_size, batcher)
    ready = False

    server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor()], options=channel_options(config))
    mnist_classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(model), server)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(model, lambda: ready), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    try:
        server.add_insecure_port(address)
    except RuntimeError as err:
        raise PortInUse(f"cannot listen on {address} ({err}); is another server running? choose --port") from err
    await server.start()
    metrics.MODEL.labels(version.name, str(version.version), runtime.provider).set(1)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.warm_up)
    batcher.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ready = True
    log.info("serving model '%s' version %d (sha256 %s…, %s) on %s; metrics on :%s",
             version.name, version.version, sha[:12], runtime.provider, address, config.metrics_port or "off")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: NOT_SERVING, refusing new calls, finishing accepted ones (grace %.1f s)", config.grace_period)
    ready = False
    await drain(server, batcher, health_servicer, loop.time() + config.grace_period)
    log.info("stopped")
    return 0


async def drain(server: grpc.aio.Server, batcher: DynamicBatcher, health_servicer, deadline: float) -> None:
    """Finish accepted calls; new predictions get UNAVAILABLE from us, not a reset from gRPC.

    The batcher closes first: it refuses new work with a clear status while it finishes what is
    queued, and callers in mid-call meet that refusal rather than a connection being torn down.
    Only then does gRPC stop, with whatever is left of the grace period.
    """
    loop = asyncio.get_running_loop()
    await health_servicer.enter_graceful_shutdown()
    try:
        await asyncio.wait_for(batcher.close(), timeout=max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        log.warning("grace period over with calls still queued: they are cancelled")
    await asyncio.sleep(min(REFUSAL_WINDOW, max(0.0, deadline - loop.time())))
    await server.stop(max(0.0, deadline - loop.time()))
