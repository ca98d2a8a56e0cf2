"""The dashboard proven against a real Prometheus (Debian's /usr/bin/prometheus) with the rules,
scraping a real `mnist-serve --workers 2` every second while real clients load it (gRPC and
REST, some calls shed by a small queue, some with a deadline too short, one refused model
version): every query of every dashboard panel returns data from Prometheus' HTTP API, and no
panel names a metric the server does not export or the rules do not record. The rules and
configurations with promtool: tests/test_monitoring_rules.py; the model and version labels:
tests/test_monitoring_labels.py.

Outside CI a missing prometheus skips with a reason; under CI=true it fails (.ci/run installs
Debian's `prometheus` package).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.prometheus import (
    MONITORING,
    RULES,
    engine,
    exported_names,
    metric_names,
    panel_queries,
    query,
    recorded_names,
    rule_groups,
    wait_for,
    with_variables,
)

LOAD_SECONDS = 40  # the issue asks for 30-60 s of load before the panels are read


def publish_broken_version(repository: Path, model: str = "mnist") -> None:
    """A newer version whose model.onnx is not ONNX: the server refuses and counts it."""
    versions = sorted(int(p.name) for p in (repository / model).iterdir() if p.name.isdigit())
    staging = (
        repository / model / ".staging"
    )  # hidden: the poller sees the version whole or not at all
    shutil.copytree(repository / model / str(versions[-1]), staging)
    (staging / "model.onnx").write_bytes(b"not an ONNX model")
    staging.rename(repository / model / str(versions[-1] + 1))


def prometheus_config(tmp_path: Path, metrics_port: int) -> Path:
    """The compose configuration with one static target on loopback, scraped every second."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    (job,) = config["scrape_configs"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["rule_files"] = [str(rule) for rule in RULES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(server, images: np.ndarray, stop: threading.Event, failures: list) -> None:
    """Real clients until `stop`: gRPC Classify and KServe, REST, expiring calls, a wrong model."""
    import grpc

    from serving.client import ClassifierClient
    from serving.rest_client import RestClient, RestError

    def grpc_caller(index: int) -> None:
        timeout = 0.0005 if index == 0 else 30  # one caller's deadline passes while it is queued
        try:
            n = 0
            while not stop.is_set():
                # A new connection every 100 calls: the kernel hands each to either worker. Channels
                # with equal arguments share one connection (gRPC's global subchannel pool), so each
                # caller's channel differs in an argument that is moot for an ip:port target.
                distinct = 30 + index / 1000
                with ClassifierClient(
                    server.target, timeout=timeout, min_resolution_interval=distinct
                ) as client:
                    for _ in range(100):
                        n += 1
                        batch = images[(index * 7 + n) % 900 :][: 1 + n % 8]
                        try:
                            client.infer_kserve(batch) if n % 2 else client.classify(batch)
                            if n % 50 == 0:
                                client.classify(batch, model_name="no-such-model")
                        except grpc.RpcError:
                            pass  # shed, expired, unknown model: the server counts them
                        if stop.is_set():
                            break
        except Exception as error:  # noqa: BLE001 - reported by the test, not lost in a thread
            failures.append(repr(error))

    def rest_caller() -> None:
        try:
            with RestClient(f"127.0.0.1:{server.http_port}", timeout=30) as rest:
                while not stop.is_set():
                    try:
                        rest.infer(images[:4])
                    except RestError:
                        pass  # shed: 429
        except Exception as error:  # noqa: BLE001
            failures.append(repr(error))

    threads = [threading.Thread(target=grpc_caller, args=(i,)) for i in range(12)]
    threads.append(threading.Thread(target=rest_caller))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


@pytest.fixture(scope="module")
def scraped(trained_repository, tmp_path_factory, mnist_test_set):
    """(Prometheus' URL, /metrics text, failures) after LOAD_SECONDS of load, the load still on."""
    prometheus = engine("prometheus")
    from serving.process import start_server

    tmp = tmp_path_factory.mktemp("monitoring")
    repository = tmp / "model_repository"
    shutil.copytree(trained_repository, repository)
    # A small queue that waits 5 ms for company: 12 callers on 2 workers overflow it now and then.
    server = start_server(
        repository,
        "--workers",
        "2",
        "--max-queue-size",
        "3",
        "--max-queue-delay-us",
        "5000",
        log_path=tmp / "server.log",
    )
    from tests.support.workers import wait_for_both_workers

    wait_for_both_workers(server)
    from serving.process import free_port

    web_port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={prometheus_config(tmp, server.metrics_port)}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            "--log.level=warn",
        ],
        stdout=open(tmp / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web_port}"
    stop, failures = threading.Event(), []
    loader = threading.Thread(target=load, args=(server, mnist_test_set[0][:1000], stop, failures))
    try:
        wait_for(
            lambda: query(base, 'up{job="mnist-serve"} == 1'), 60, "Prometheus scraping the server"
        )
        publish_broken_version(repository)  # the poller (every 5 s) refuses it; version 1 serves on
        loader.start()
        time.sleep(LOAD_SECONDS)
        metrics_text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        yield base, metrics_text, failures
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(120)
        proc.terminate()
        proc.wait(30)
        server.stop()


def test_the_load_did_what_the_panels_show(scraped):
    base, metrics_text, failures = scraped
    assert not failures, failures
    # What the panels below need: shed calls, a refused version, both workers, errors by code.
    assert query(base, 'sum(mnist_dropped_requests_total{reason="queue_full"}) > 0'), (
        "no call was shed"
    )
    assert query(base, 'sum(mnist_model_load_failures_total{model="mnist"}) > 0'), (
        "no version was refused"
    )
    assert len(query(base, "mnist_worker_images > 0")) == 2, "both workers classify"
    codes = {r["metric"]["code"] for r in query(base, "sum by (code) (mnist_requests_total)")}
    assert {"OK", "RESOURCE_EXHAUSTED", "NOT_FOUND", "200"} <= codes, codes
    # The per-call metrics name the version that answered; a call no model answered names none.
    answered = query(base, 'sum by (model, version) (mnist_requests_total{method="Classify"})')
    assert {(r["metric"].get("model", ""), r["metric"].get("version", "")) for r in answered} == {
        ("mnist", "1"),
        ("", ""),
    }


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(scraped):
    base, _metrics_text, _ = scraped
    empty = []
    for title, expr in panel_queries():
        result = query(base, with_variables(expr))
        values = [float(r["value"][1]) for r in result]
        if not values or all(np.isnan(values)):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_no_panel_queries_a_metric_the_server_does_not_export(scraped):
    _base, metrics_text, _ = scraped
    known = exported_names(metrics_text) | recorded_names() | {"up"}
    unknown = {
        f"{title}: {name}"
        for title, expr in panel_queries()
        for name in metric_names(expr)
        if name not in known
    }
    assert not unknown, unknown
    # And the rules read only what the server exports or other rules record.
    rule_metrics = {
        name
        for group in rule_groups()
        for rule in group["rules"]
        for name in metric_names(rule["expr"])
    }
    assert rule_metrics - known == set(), rule_metrics - known
