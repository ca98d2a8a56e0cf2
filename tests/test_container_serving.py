"""docker-compose.yml on a real Docker engine, as docs/containers.md uses it, on the session's
images (tests/support/images.py: built once from a clean checkout of HEAD).

Runs whenever a Docker engine answers `docker info` (and docker-compose or `docker compose` is
there); outside CI it skips with one line otherwise, under CI=true it fails instead (.ci/run
installs and starts the engine). In one compose project with a unique name, this module:

1. runs `docker compose up --scale server=3` with a short training: the trainer exits 0, every
   server replica turns healthy by its own healthcheck, Envoy (the one published entry point)
   turns ready, a Locust master with 2 workers runs headless for a bounded time against
   dns:///server:8500;
2. checks every container runs as uid 1000 and the server image holds no TensorFlow, in the
   running containers; Locust ends with 0 failures and its CSV and HTML report in ./reports, and
   every replica served calls (its own mnist_requests_total); `mnist-predict` and tritonclient on
   this machine get correct answers through the published port (Envoy);
3. Locust on this machine through the entry point: with 3 replicas 0 failures and every replica
   served calls; `docker stop` of one replica under that load (SIGTERM, drain) costs 0 failed
   calls; scaled back to 1 replica, the same load (calls/s with 1 and 3 replicas are figures);
4. `RETRAIN=1` publishes version 2; the GPU image serves on the CPU with one log line saying why
   under `--device auto` and stops with one line under `--device cuda`; `docker compose stop`
   drains the server, which exits 0; `down -v` leaves no container, volume or network.

The steps (tests/support/compose_scenario.py) run once, in order, in the module fixture, which
records what each saw; each test checks one promise against that record, so the tests pass or
fail alone in any order. Everything it creates is removed at the end, even when a test fails.
Figures (Locust calls/s, up times): `pytest -s`. The TLS override: tests/test_compose_tls_stack.py.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support.compose_scenario import (
    LOCUST_RUN_TIME_S,
    LOCUST_WORKERS,
    SCENARIO,
    SERVERS,
)
from tests.support.images import TARGETS
from tests.support.stack import APP_UID, TRAIN_ARGS, compose_project

# Building cold (pip downloads TensorFlow and NVIDIA's CUDA wheels) takes minutes.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def stack(images, mnist_path):
    locust = {
        "LOCUST_HEADLESS": "true",
        "LOCUST_RUN_TIME": f"{LOCUST_RUN_TIME_S}s",
        "LOCUST_USERS": "8",
        "LOCUST_SPAWN_RATE": "8",
        "LOCUST_EXPECT_WORKERS": str(LOCUST_WORKERS),
    }
    # The project is named as the images are tagged (the GPU step names its volume after it).
    with compose_project(images, mnist_path, images.tag, locust, TARGETS) as stack:
        started = time.monotonic()
        # Compose waits for the trainer to succeed and the server to turn healthy before Locust.
        stack.run_compose(
            "up",
            "-d",
            "--no-build",
            "--scale",
            f"server={SERVERS}",
            "--scale",
            f"locust-worker={LOCUST_WORKERS}",
            timeout=900,
        )
        stack.figures["up_s"] = f"{time.monotonic() - started:.0f}"
        # The scenario runs once, in this order; the tests below check what it saw, in any order.
        stack.run_steps(SCENARIO)
        yield stack


def test_trainer_exits_0_and_server_turns_healthy_by_its_healthcheck(stack):
    stack.check("up")
    trainer, log = stack.seen["trainer"], stack.seen["trainer_log"]
    assert trainer["State"]["Status"] == "exited" and trainer["State"]["ExitCode"] == 0, log[-3000:]
    assert f"training: mnist-train --out /models --artifacts /artifacts {TRAIN_ARGS}" in log, log[
        -3000:
    ]
    health = stack.seen["server_health"]
    assert len(health) == SERVERS + 1 and set(health.values()) == {"healthy"}, (
        f"{health}\nserver:\n{stack.seen['server_log'][-3000:]}"
        f"\nenvoy:\n{stack.seen['envoy_log'][-2000:]}"
    )


def test_containers_run_as_app_and_the_server_holds_no_tensorflow(stack):
    stack.check("users")
    uids = stack.seen["uids"]
    assert len(uids) == SERVERS + 2 + LOCUST_WORKERS and set(uids.values()) == {APP_UID}, uids
    assert stack.seen["trainer_user"] == "app"
    owners = stack.seen["model_owners"]
    assert owners and set(owners) == {APP_UID}, owners
    found = stack.seen["server_packages"]
    assert found == "None None ['onnxruntime']", (
        f"server image: tensorflow, training, runtimes = {found}"
    )


def test_host_clients_get_correct_answers_through_the_published_port(stack):
    stack.check("host_clients")
    for api in ("classifier", "kserve"):
        returncode, output = stack.seen[f"predict_{api}"]
        assert returncode == 0, output
        accuracy = float(re.search(r"accuracy: \d+/500 = ([\d.]+)", output)[1])
        assert accuracy >= 0.9, f"mnist-predict --api {api}: {output}"
    assert stack.seen["triton_ready"]
    assert stack.seen["triton_accuracy"] >= 0.9, stack.seen["triton_accuracy"]


def test_locust_master_and_workers_run_headless_with_no_failures_and_reports(stack):
    stack.check("locust")
    assert stack.seen["locust_exit"] == "0", (
        f"the Locust master exited {stack.seen['locust_exit']}:\n{stack.seen['locust_log'][-3000:]}"
    )
    assert stack.seen["locust_workers"] == LOCUST_WORKERS
    total = stack.seen["locust_total"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    html = stack.seen["locust_html"]
    assert "<html" in html.lower() and "Classify" in html, (
        "locust.html is not Locust's report of this run"
    )
    # dns:///server:8500 and round_robin in each user's client: every replica served calls.
    spread = stack.seen["compose_spread"]
    assert len(spread) == SERVERS and all(count > 0 for count in spread.values()), spread


def _no_failures(total: dict) -> None:
    assert (
        total["exit"] == 0 and int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    ), {
        key: value
        for key, value in total.items()
        if key in ("exit", "Request Count", "Failure Count", "output")
    }


def test_the_entry_point_balances_every_call_over_the_replicas(stack):
    stack.check("entry3")
    _no_failures(stack.seen["entry3"])
    spread = stack.seen["entry3_spread"]
    assert len(spread) == SERVERS and all(count > 0 for count in spread.values()), spread


def test_stopping_a_replica_under_load_fails_no_call(stack):
    stack.check("drain")
    state = stack.seen["drained_replica"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state  # drained, not killed
    _no_failures(stack.seen["drain"])


def test_one_replica_behind_the_entry_point_serves_the_same_load(stack):
    stack.check("entry1")
    assert stack.seen["replicas_after_scale_down"] == 1
    _no_failures(stack.seen["entry1"])


def test_retrain_publishes_version_2(stack):
    stack.check("retrain")
    assert stack.seen["retrain_exit"] == "0", stack.seen["retrain_log"][-3000:]
    assert {"1", "2"} <= set(stack.seen["versions"]), stack.seen["versions"]


def test_gpu_image_serves_on_cpu_under_auto_and_stops_under_cuda(stack):
    stack.check("gpu_image")
    log = stack.seen["gpu_auto_log"]
    assert stack.seen["gpu_auto_health"] == "healthy", log[-3000:]
    # Each session it opens says, in one line, that and why it fell back (one reason for all).
    reasons = {
        line.split("fell back to the CPU:", 1)[1].split(";")[0].strip()
        for line in log.splitlines()
        if "fell back to the CPU:" in line
    }
    assert len(reasons) == 1 and "Traceback" not in log, log[-3000:]
    assert stack.seen["gpu_auto_uid"] == APP_UID and stack.seen["gpu_auto_tensorflow"] == "None"
    returncode, output = stack.seen["gpu_cuda"]
    # Its log lines may come first; the error that stops it is one line, the last, no traceback.
    last = output.splitlines()[-1] if output else ""
    assert (
        returncode != 0
        and last.startswith("mnist-serve: error: --device cuda")
        and "Traceback" not in output
    ), output


def test_stop_drains_the_server_which_exits_0(stack):
    stack.check("stop")
    state = stack.seen["server_stopped"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, stack.seen["server_stop_log"][
        -3000:
    ]


def test_down_v_leaves_nothing(stack):
    stack.check("down")
    assert stack.seen["left_after_down"] == {"containers": [], "volumes": [], "networks": []}, (
        stack.seen["left_after_down"]
    )
