"""Tracing's settings and edges: with tracing off nothing of OpenTelemetry is imported, bad
settings stop the server with one line, traceparents are checked, and Envoy passes the context on."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from serving import tracing
from serving.client import ClassifierClient
from serving.process import free_port
from serving.rest_client import RestClient
from tests.support.common import ROOT
from tests.support.envoy import envoy_binary, start_envoy
from tests.support.tracing import STAGES, check_call_trace, in_trace


def test_tracing_off_imports_nothing_of_opentelemetry():
    """Off (the default), a server never imports the SDK: its calls pay one branch per stage."""
    probe = (
        "import sys\n"
        "import serving.server, serving.cli, serving.client, serving.rest_client, serving.supervisor\n"
        "from serving import tracing\n"
        "from serving.http_api.app import build_app\n"
        "assert tracing.setup(tracing.TraceSettings()) is False and not tracing.on\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
            "choose grpc or http",
        ),
    ],
)
def test_bad_tracing_settings_stop_the_server_with_one_line(trained_repository, environ, message):

    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--model-repository", str(trained_repository)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, **environ},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_traceparents_are_checked_and_made_well():
    made = tracing.new_traceparent()
    assert tracing.check_traceparent(made) == made and made.endswith("-01")
    assert tracing.new_traceparent(sampled=False).endswith("-00")
    for bad in (
        "",
        "00-abc-def-01",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ):
        with pytest.raises(ValueError, match="W3C traceparent"):
            tracing.check_traceparent(bad)
    with pytest.raises(ValueError):
        ClassifierClient("127.0.0.1:1", traceparent="nonsense")
    assert (
        np.unique([tracing.trace_id_of(tracing.new_traceparent()) for _ in range(100)]).size == 100
    )


def loopback(config: dict, ports: dict[str, tuple[int, int]]) -> None:
    """Envoy's listeners and clusters on loopback: {listener name: (its port, the replica's)}."""
    for listener in config["static_resources"]["listeners"]:
        port = ports[listener["name"]][0]
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    for cluster, (_, upstream) in zip(config["static_resources"]["clusters"], ports.values()):
        cluster["type"] = "STATIC"  # the replica by its address: no DNS name on loopback
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": upstream,
        }


def test_envoy_in_compose_passes_the_trace_context_on(
    traced_server, receiver, mnist_test_set, tmp_path
):
    """deploy/compose/envoy.yaml + envoy-http.yaml as compose merges them (loopback ports, the
    replica by address): gRPC and REST calls through Envoy are still the caller's children."""
    import yaml

    binary = envoy_binary()
    compose = ROOT / "deploy" / "compose"
    config = yaml.safe_load((compose / "envoy.yaml").read_text())
    http = yaml.safe_load((compose / "envoy-http.yaml").read_text())["static_resources"]
    for key in ("listeners", "clusters"):  # what `envoy --config-yaml` does: lists are appended
        config["static_resources"][key] += http[key]
    grpc_port, http_port, admin = free_port(), free_port(), free_port()
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    loopback(
        config,
        {"grpc": (grpc_port, traced_server.port), "http": (http_port, traced_server.http_port)},
    )
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
    proc = start_envoy(binary, tmp_path / "envoy.yaml", tmp_path / "envoy.log", concurrency=1)
    try:
        parent, rest_parent = tracing.new_traceparent(), tracing.new_traceparent()
        with ClassifierClient(
            f"127.0.0.1:{grpc_port}", timeout=30, traceparent=parent, tracestate="congo=t61rcWkgMzE"
        ) as client:
            client.wait_until_ready(60)
            assert len(client.classify(mnist_test_set[0][:2]).labels) == 2
        with RestClient(f"127.0.0.1:{http_port}", timeout=30, traceparent=rest_parent) as rest:
            assert rest.infer(mnist_test_set[0][:2]).shape == (2, 10)
        spans = receiver.wait_for(
            lambda s: (
                in_trace(tracing.trace_id_of(parent), STAGES)(s)
                and in_trace(tracing.trace_id_of(rest_parent), STAGES)(s)
            )
        )
        check_call_trace(spans, parent, "mnist.v1.Classifier/Classify")
        check_call_trace(spans, rest_parent, "POST /v2/models/{model}/infer")
    finally:
        proc.terminate()
        proc.wait(10)
