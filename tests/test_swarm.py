"""The stack on a real 3-node Docker Swarm made on this machine.

The cluster: docker/local_swarm.py; the stack: deploy/swarm/; the guide: docs/swarm.md.

Runs where root can make network namespaces and a Docker engine answers; outside CI it skips with
one line otherwise, under CI=true it fails instead (.ci/run installs docker.io, docker-registry,
iproute2 and iptables). From the session's clean checkout of HEAD and its images
(tests/support/images.py), in one scenario recorded step by step (tests/support/swarm_scenario.py;
each test checks one promise against the record, so they pass or fail alone in any order):

1. `local_swarm.py up --no-build`: a registry, 3 nodes (one manager, two workers) in their own
   network namespaces, the session's images pushed, the test model pushed as a model image, the stack
   deployed and every replica healthy; 3 nodes Ready and the server's replicas on >= 2 nodes;
2. mnist-predict's client through the entry point (Envoy on the manager): >= 0.9 accuracy on real
   MNIST test images, answered by replicas on more than one node (their own request counters);
3. under 16 steady callers through the entry point (ClassifierClient, with its retries):
   a rolling update to a newly built server image: 0 failed calls, every replica on the new image;
   a new model version published: every replica answers with it within the poll intervals plus a
   few seconds, 0 failed calls; a worker node lost (its link cut, its daemon and containers killed):
   at most the calls in flight on it fail, Swarm reschedules its replicas on the other nodes and
   the service is back to 3 healthy replicas; the node comes back and rejoins; the other worker
   drained: 0 failed calls, its replicas move; calls/s with 3 replicas and then 1 (figures);
4. `local_swarm.py down` leaves no namespace, bridge, firewall rule, registry trust, state folder or
   pushed image behind (and runs at the end whatever failed).
Figures (up time, calls/s, p99 per event): `pytest -s`. On this machine every node shares the
same 2 cores: the figures show spread and zero loss, not capacity. The stack files and
model_sync.py without a cluster: tests/test_swarm_stack_files.py, tests/test_model_sync.py.
"""

from __future__ import annotations

import shutil
import time

import pytest

from serving.process import free_port
from tests.support.engine import require
from tests.support.scenario import figures_line
from tests.support.steady_load import CALLERS
from tests.support.swarm_cluster import Swarm, problem
from tests.support.swarm_scenario import SCENARIO, down

pytestmark = pytest.mark.timeout(2400)
# model_sync.py's interval + the server's repository poll (deploy/swarm/stack.yml)...
MODEL_POLL_S = 3 + 2
# ...plus loading and warming the new version up on a node that shares 2 cores with the others.
MODEL_LOAD_S = 15
SWARM_TARGETS = ("server", "envoy", "locust")  # what deploy/swarm/stack.yml runs


@pytest.fixture(scope="module")
def swarm(trained_repository, mnist_test_set, tmp_path_factory, images):
    require(
        problem(),
        "the swarm tests make a 3-node Docker Swarm on this machine "
        "(.ci/run installs and starts them)",
    )
    repository = tmp_path_factory.mktemp("swarm") / "model_repository"
    shutil.copytree(trained_repository / "mnist", repository / "mnist")
    test_images, labels = mnist_test_set
    swarm = Swarm(images.checkout, images.tag, free_port(), repository)
    swarm.seen["test_set"] = (test_images, labels)
    swarm.seen["images"] = test_images[:2000]
    try:
        for target in SWARM_TARGETS:
            images.image(target)  # built once per session; `up --no-build` pushes them
        swarm.cli("down", timeout=300)  # a cluster a killed run left behind
        started = time.monotonic()
        up = swarm.cli("up", "--no-build", "--model-repository", str(repository), timeout=1800)
        swarm.figures["up_s"] = f"{time.monotonic() - started:.0f}"
        swarm.seen["up_log"] = up.stdout
        swarm.run_steps(SCENARIO)
        swarm.step("down", down)
        yield swarm
    finally:
        if "down_log" not in swarm.seen:
            swarm.cli("down", timeout=600)
        print(
            figures_line(
                "swarm figures (2 shared cores: spread and loss, not capacity)", swarm.figures
            )
        )


def test_three_nodes_ready_and_replicas_spread(swarm):
    swarm.check("placed")
    nodes = swarm.seen["nodes"]
    assert len(nodes) == 3 and all(
        status.startswith("Ready Active") for status in nodes.values()
    ), nodes
    placement = swarm.seen["placement"]
    assert len(placement) == 3 and len(set(placement)) >= 2, f"server replicas on nodes {placement}"


def test_entry_point_reads_mnist_with_answers_from_several_nodes(swarm):
    swarm.check("accuracy")
    assert swarm.seen["accuracy"] >= 0.9, swarm.seen["accuracy"]
    answered = {node: calls for node, calls in swarm.seen["answered_by"].items() if calls > 0}
    assert len(answered) >= 2, f"calls counted per node: {swarm.seen['answered_by']}"


def test_rolling_update_to_a_new_image_fails_no_call(swarm):
    swarm.check("rolling_update")
    result = swarm.seen["rolling_update"]
    assert result.ok > 0 and result.failed == 0, result.errors
    assert swarm.seen["images_after_update"] == [swarm.seen["new_image"]]


def test_new_model_version_reaches_every_replica_without_a_failed_call(swarm):
    swarm.check("new_model")
    result = swarm.seen["new_model"]
    assert result.ok > 0 and result.failed == 0, result.errors
    version = swarm.seen["new_version"]
    assert set(swarm.seen["replica_versions"].values()) == {version}, swarm.seen["replica_versions"]
    assert swarm.seen["model_reached_all_s"] <= MODEL_POLL_S + MODEL_LOAD_S
    assert result.versions.get(version, 0) > 0, (
        f"versions answered through the entry point: {result.versions}"
    )


def test_lost_worker_costs_at_most_its_calls_in_flight_and_is_replaced(swarm):
    swarm.check("node_lost")
    result = swarm.seen["node_lost"]
    lost = swarm.seen["lost"]  # a worker that ran a replica (swarm_scenario.py picks it)
    assert lost in swarm.seen["before_loss"], (
        f"no replica ran on {lost}: {swarm.seen['before_loss']}"
    )
    # Each caller has one call in flight; one that Envoy sent to the lost node before its health
    # checks (1 s) took the node out waits for its deadline and fails: at most one per caller.
    assert result.ok > 0 and result.failed <= CALLERS, result.errors
    assert len(swarm.seen["after_loss"]) == 3 and lost not in swarm.seen["after_loss"]
    assert swarm.seen["revived"].startswith("Ready")


def test_drained_node_costs_no_call(swarm):
    swarm.check("drain")
    result = swarm.seen["drain"]
    drained = swarm.seen["drained"]
    assert drained in swarm.seen["before_drain"], swarm.seen["before_drain"]
    assert result.ok > 0 and result.failed == 0, result.errors
    assert len(swarm.seen["after_drain"]) == 3 and drained not in swarm.seen["after_drain"]


def test_calls_per_second_with_three_and_one_replicas(swarm):
    swarm.check("throughput_3", "throughput_1")
    for count in (3, 1):
        result = swarm.seen[f"throughput_{count}"]
        assert result.ok > 0 and result.failed == 0, result.errors


def test_down_leaves_nothing(swarm):
    swarm.check("down")
    assert swarm.seen["leftovers"] == []
    assert "removed" in swarm.seen["down_log"]
