"""The steps tests/test_swarm.py runs, in order, on the cluster `local_swarm.py up` made: each
records what it saw in `swarm.seen` (and figures in `swarm.figures`) for the tests to check."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from tests.support.steady_load import STEADY_S, SteadyLoad, record, under_load
from tests.support.swarm_cluster import (
    ENTRY,
    NAME,
    SERVER,
    Swarm,
    docker_on,
    leftovers,
    node_ids,
    replica_versions,
    requests_by_node,
    run,
    running_nodes,
    settled,
    tasks,
    wait_for,
)


def _placed(swarm: Swarm) -> None:
    swarm.seen["nodes"] = node_ids()
    swarm.seen["placement"] = running_nodes()


def _accuracy(swarm: Swarm) -> None:
    from serving.client import ClassifierClient

    images, labels = swarm.seen["test_set"]
    before = requests_by_node()
    correct = 0
    with ClassifierClient(ENTRY, timeout=30) as client:
        for start in range(0, 500, 50):
            batch = (images[start : start + 50, ..., None] / 255).astype(np.float32)
            correct += int((client.classify(batch).labels == labels[start : start + 50]).sum())
    after = requests_by_node()
    swarm.seen["accuracy"] = correct / 500
    swarm.seen["answered_by"] = {node: after[node] - before.get(node, 0) for node in after}


def _throughput(replica_count: int):
    def measure(swarm: Swarm) -> None:
        docker_on(1, "service", "scale", "--detach=false", f"{SERVER}={replica_count}", timeout=600)
        wait_for(f"{replica_count} healthy replicas", lambda: settled(replica_count), timeout=300)
        with SteadyLoad(swarm.seen["images"]) as load:
            time.sleep(STEADY_S)
        result = load.result()
        swarm.seen[f"throughput_{replica_count}"] = result
        swarm.figures[f"calls_per_s_{replica_count}_replicas"] = f"{result.calls_per_s:.0f}"
        swarm.figures[f"p99_ms_{replica_count}_replicas"] = f"{result.p99_ms:.0f}"

    return measure


def _rolling_update(swarm: Swarm) -> None:
    old = f"{swarm.registry}/mnist-cnn-serving-server:{swarm.tag}"
    new = f"{old}-next"

    def update(swarm: Swarm) -> None:
        with tempfile.TemporaryDirectory() as context:  # a newly built image: one more layer
            (Path(context) / "Dockerfile").write_text(
                f"FROM {old}\nLABEL org.example.rollout={uuid.uuid4().hex}\n"
            )
            run(
                "docker",
                "build",
                "-q",
                "-t",
                new,
                context,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
        run("docker", "push", "-q", new, timeout=600)
        docker_on(1, "service", "update", "--detach=false", "--image", new, SERVER, timeout=900)
        wait_for("3 healthy replicas on the new image", lambda: settled(3, image=new), timeout=300)

    under_load(swarm, "rolling_update", update)
    swarm.seen["images_after_update"] = sorted({t["Image"] for t in tasks()})
    swarm.seen["new_image"] = new


def _new_model(swarm: Swarm) -> None:
    from core.metadata import ModelMetadata
    from core.repository import load_version, write_version

    current = load_version(swarm.repository, "mnist")
    published = write_version(
        swarm.repository,
        "mnist",
        current.model_path.read_bytes(),
        ModelMetadata.read(current.directory / "metadata.json"),
    )
    swarm.seen["new_version"] = str(published.version)

    def publish(swarm: Swarm) -> None:
        started = time.monotonic()
        swarm.cli(
            "publish-model", str(swarm.repository), "--version", str(published.version), timeout=600
        )
        swarm.seen["model_pushed_at"] = time.monotonic()
        swarm.figures["model_push_s"] = f"{swarm.seen['model_pushed_at'] - started:.0f}"
        wait_for(
            f"every replica on version {published.version}",
            lambda: set(replica_versions().values()) == {str(published.version)},
            timeout=120,
        )

    with SteadyLoad(swarm.seen["images"]) as load:  # under_load's, keeping the answers' timeline
        swarm.seen["load"] = load
        time.sleep(STEADY_S)
        publish(swarm)
        time.sleep(STEADY_S)
    record(swarm, "new_model", load.result())
    # Envoy spreads the calls over every replica: once the old version answers no more, every
    # replica answers with the new one.
    old = str(current.version)
    reached = load.last_seen.get(old, swarm.seen["model_pushed_at"]) - swarm.seen["model_pushed_at"]
    swarm.seen["model_reached_all_s"] = reached
    swarm.figures["model_reached_all_replicas_s"] = f"{reached:.0f}"
    swarm.seen["replica_versions"] = replica_versions()


def _worker_running_a_replica(preferred: int) -> int:
    """The index of a worker node that runs a server replica now, `preferred` if it does.

    Swarm never moves a running task: after a rolling update or a lost node the replicas may sit
    on two nodes (a CI run saw node1, node2, node2), so the node to lose or drain is picked from
    where replicas run. Should none run on a worker, the service is rescheduled first (`--force`),
    which spreads them again. Node 1 is the manager: losing it loses the control plane."""
    workers = sorted((2, 3), key=lambda index: index != preferred)
    for _ in range(2):
        placed = running_nodes()
        for index in workers:
            if f"{NAME}-node{index}" in placed:
                return index
        docker_on(1, "service", "update", "--force", "--detach=false", SERVER, timeout=900)
        wait_for("3 healthy replicas, rescheduled", lambda: settled(3), timeout=300)
    raise AssertionError(f"no server replica on a worker node after rescheduling: {placed}")


def _node_lost(swarm: Swarm) -> None:
    index = _worker_running_a_replica(preferred=3)
    lost = swarm.seen["lost"] = f"{NAME}-node{index}"

    def lose(swarm: Swarm) -> None:
        swarm.seen["before_loss"] = running_nodes()
        swarm.cli("kill-node", str(index), timeout=120)
        wait_for(f"{lost} Down", lambda: node_ids().get(lost, "").startswith("Down"), timeout=120)
        wait_for(
            "3 healthy replicas on the other nodes", lambda: settled(3, avoid=lost), timeout=300
        )

    under_load(swarm, "node_lost", lose)
    swarm.seen["after_loss"] = running_nodes()
    swarm.cli("revive-node", str(index), timeout=300)
    wait_for(
        f"{lost} Ready again", lambda: node_ids().get(lost, "").startswith("Ready"), timeout=180
    )
    swarm.seen["revived"] = node_ids()[lost]


def _drain(swarm: Swarm) -> None:
    drained = swarm.seen["drained"] = f"{NAME}-node{_worker_running_a_replica(preferred=2)}"

    def drain(swarm: Swarm) -> None:
        swarm.seen["before_drain"] = running_nodes()
        docker_on(1, "node", "update", "--availability", "drain", drained)
        wait_for(
            f"no replica on {drained}, 3 healthy", lambda: settled(3, avoid=drained), timeout=300
        )

    under_load(swarm, "drain", drain)
    swarm.seen["after_drain"] = running_nodes()
    docker_on(1, "node", "update", "--availability", "active", drained)


SCENARIO = [
    ("placed", _placed),
    ("accuracy", _accuracy),
    ("throughput_3", _throughput(3)),
    ("rolling_update", _rolling_update),
    ("new_model", _new_model),
    ("node_lost", _node_lost),
    ("drain", _drain),
    ("throughput_1", _throughput(1)),
]


def down(swarm: Swarm) -> None:
    started = time.monotonic()
    swarm.seen["down_log"] = swarm.cli("down", timeout=600).stdout
    swarm.figures["down_s"] = f"{time.monotonic() - started:.0f}"
    swarm.seen["leftovers"] = leftovers(swarm)
