"""The TLS override on a real Docker engine: `-f docker-compose.yml -f docker-compose.tls.yml`
on the session's images (tests/support/images.py), certificates from docker/make-dev-certs.py in
the checkout's ./certs (as docs/containers.md has it).

2 replicas and Envoy turn healthy by their mTLS healthchecks, Locust in compose runs with 0
failures, `mnist-predict` over mTLS with the token through Envoy's published port reads real
MNIST correctly and both replicas answer; no client certificate, no token and plaintext are
refused; `down -v` leaves nothing. Skips and fails as tests/test_container_serving.py does; the
steps run once in the module fixture and each test checks what they saw.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.support.engine import docker, inspect
from tests.support.stack import (
    Stack,
    aggregated,
    compose_project,
    mnist_predict,
    requests_counted,
    wait_healthy,
)

TLS_FILES = ("docker-compose.yml", "docker-compose.tls.yml")
TLS_SERVERS = 2
TLS_LOCUST_RUN_TIME_S = 10
TLS_TARGETS = ("trainer", "server", "envoy", "locust")  # what its `up` runs

pytestmark = pytest.mark.timeout(2400)  # the session's images may be built cold first


def _tls_up(stack: Stack) -> None:
    stack.seen["tls_trainer"] = inspect(stack.container("trainer"))["State"]
    stack.seen["tls_health"] = wait_healthy([*stack.containers("server"), stack.container("envoy")])
    stack.seen["tls_server_log"] = stack.logs("server")
    stack.seen["tls_envoy_log"] = stack.logs("envoy")


def _tls_locust(stack: Stack) -> None:
    master = stack.container("locust")
    stack.seen["tls_locust_exit"] = docker(
        "wait", master, timeout=TLS_LOCUST_RUN_TIME_S + 240
    ).stdout.strip()
    stack.seen["tls_locust_log"] = stack.logs("locust") + stack.logs("locust-worker")
    stack.seen["tls_locust_total"] = aggregated(stack.checkout / "reports" / "locust_stats.csv")


def _tls_clients(stack: Stack) -> None:
    certs = stack.checkout / "certs"
    mtls = [
        *("--tls-ca", str(certs / "ca.crt")),
        *("--tls-cert", str(certs / "client.crt")),
        *("--tls-key", str(certs / "client.key")),
    ]
    token = ["--auth-token-file", str(certs / "token")]
    replicas = stack.replicas()
    before = {cid: requests_counted(cid, inference_only=True) for cid in replicas}
    for api in ("classifier", "kserve"):
        stack.seen[f"tls_predict_{api}"] = mnist_predict(stack, "--api", api, *mtls, *token)
    stack.seen["tls_spread"] = {
        cid: requests_counted(cid, inference_only=True) - before[cid] for cid in replicas
    }
    ca_only = ("--tls-ca", str(certs / "ca.crt"))
    stack.seen["tls_no_client_cert"] = mnist_predict(stack, *ca_only, *token)
    stack.seen["tls_no_token"] = mnist_predict(stack, *mtls)
    stack.seen["tls_plaintext"] = mnist_predict(stack, *token, "--timeout", "5")


def _tls_down(stack: Stack) -> None:
    stack.run_compose("down", "-v", "--remove-orphans")
    stack.seen["tls_left_after_down"] = stack.left_after_down()


TLS_SCENARIO = [
    ("tls_up", _tls_up),
    ("tls_locust", _tls_locust),
    ("tls_clients", _tls_clients),
    ("tls_down", _tls_down),
]


@pytest.fixture(scope="module")
def tls_stack(images, mnist_path):
    locust = {
        "LOCUST_HEADLESS": "true",
        "LOCUST_RUN_TIME": f"{TLS_LOCUST_RUN_TIME_S}s",
        "LOCUST_USERS": "4",
        "LOCUST_SPAWN_RATE": "4",
        "LOCUST_EXPECT_WORKERS": "1",
    }
    project = f"{images.tag}tls"
    with compose_project(images, mnist_path, project, locust, TLS_TARGETS, TLS_FILES) as stack:
        made = subprocess.run(
            [sys.executable, "docker/make-dev-certs.py"],
            cwd=images.checkout,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        started = time.monotonic()
        scale = ("--scale", f"server={TLS_SERVERS}", "--scale", "locust-worker=1")
        stack.run_compose("up", "-d", "--no-build", *scale, timeout=900)
        stack.figures["tls_up_s"] = f"{time.monotonic() - started:.0f}"
        stack.run_steps(TLS_SCENARIO)
        yield stack


def test_tls_replicas_and_envoy_turn_healthy_by_their_mtls_healthchecks(tls_stack):
    tls_stack.check("tls_up")
    assert tls_stack.seen["tls_trainer"]["ExitCode"] == 0, tls_stack.seen["tls_trainer"]
    health = tls_stack.seen["tls_health"]
    seen = tls_stack.seen
    assert len(health) == TLS_SERVERS + 1 and set(health.values()) == {"healthy"}, (
        f"{health}\nserver:\n{seen['tls_server_log'][-3000:]}"
        f"\nenvoy:\n{seen['tls_envoy_log'][-2000:]}"
    )


def test_tls_locust_in_compose_loads_with_the_client_certificate_and_token(tls_stack):
    tls_stack.check("tls_locust")
    assert tls_stack.seen["tls_locust_exit"] == "0", tls_stack.seen["tls_locust_log"][-3000:]
    total = tls_stack.seen["tls_locust_total"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total


def test_tls_mnist_predict_through_envoy_with_mtls_and_the_token_is_correct_on_every_replica(
    tls_stack,
):
    tls_stack.check("tls_clients")
    for api in ("classifier", "kserve"):
        returncode, output = tls_stack.seen[f"tls_predict_{api}"]
        found = re.search(r"accuracy: \d+/500 = ([\d.]+)", output)
        assert returncode == 0 and found and float(found[1]) >= 0.9, (
            f"mnist-predict --api {api}: {output}"
        )
    spread = tls_stack.seen["tls_spread"]  # Envoy balanced the calls over TLS to both replicas
    assert len(spread) == TLS_SERVERS and all(count > 0 for count in spread.values()), spread


def test_tls_envoy_refuses_calls_without_a_client_certificate_a_token_or_tls(tls_stack):
    tls_stack.check("tls_clients")
    for case, status in (
        ("tls_no_client_cert", "UNAVAILABLE"),
        ("tls_no_token", "UNAUTHENTICATED"),
        ("tls_plaintext", "UNAVAILABLE"),
    ):
        returncode, output = tls_stack.seen[case]
        assert returncode == 1 and f"answered {status}" in output, f"{case}: {output}"


def test_tls_down_v_leaves_nothing(tls_stack):
    tls_stack.check("tls_down")
    assert tls_stack.seen["tls_left_after_down"] == {
        "containers": [],
        "volumes": [],
        "networks": [],
    }, tls_stack.seen["tls_left_after_down"]
