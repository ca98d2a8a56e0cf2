"""The stack on a real 3-node Docker Swarm made on this machine.

The cluster: docker/local_swarm.py; the stack: deploy/swarm/; the guide: docs/swarm.md.

Runs where root can make network namespaces and a Docker engine answers; outside CI it skips with
one line otherwise, under CI=true it fails instead (.ci/run installs docker.io, docker-registry,
iproute2 and iptables). From a clean checkout of HEAD (`git archive`), in one scenario recorded step
by step (each test checks one promise against the record, so they pass or fail alone in any order):

1. `local_swarm.py up`: a registry, 3 nodes (one manager, two workers) in their own network
   namespaces, the images built and pushed, the test model pushed as a model image, the stack
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
same 2 cores: the figures show spread and zero loss, not capacity.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from serving.process import free_port
from tests.support.checkout import clean_checkout

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() == "true"
NAME = "mnswt"  # everything the cluster makes is named after it (make swarm-up uses mnsw)
SUBNET = "10.213.7"
MANAGER_IP = f"{SUBNET}.11"
ENTRY = f"{MANAGER_IP}:8500"
STACK = "mnist"
SERVER = f"{STACK}_server"
CALLERS = 16
STEADY_S = 6  # load before and after each event
MODEL_POLL_S = (
    3 + 2
)  # model_sync.py's interval + the server's repository poll (deploy/swarm/stack.yml)
# ...plus loading and warming the new version up on a node that shares 2 cores with the others.
MODEL_LOAD_S = 15

pytestmark = pytest.mark.timeout(2400)


# --- the engine and the cluster -------------------------------------------------------------------


def _problem() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces, iptables, more dockerd daemons)"
    for tool in ("docker", "dockerd", "ip", "iptables", "docker-registry", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` got no answer in 30 s"
    if info.returncode != 0:
        return "no Docker engine answers `docker info`"
    return None


def _run(
    *argv: str, timeout: float = 300, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n"
            f"{(result.stderr + result.stdout)[-4000:]}"
        )
    return result


def node_host(index: int) -> str:
    return f"unix:///run/{NAME}/node{index}/docker.sock"


def docker_on(index: int, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return _run("docker", "-H", node_host(index), *args, **kwargs)


@dataclass
class Swarm:
    checkout: Path
    tag: str
    registry_port: int
    repository: Path
    figures: dict[str, str] = field(default_factory=dict)
    seen: dict[str, object] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def registry(self) -> str:
        return f"{SUBNET}.1:{self.registry_port}"

    def cli(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        argv = [
            sys.executable,
            str(self.checkout / "docker" / "local_swarm.py"),
            "--name",
            NAME,
            "--subnet",
            SUBNET,
            "--registry-port",
            str(self.registry_port),
            "--tag",
            self.tag,
            *args,
        ]
        return _run(*argv, timeout=timeout, cwd=self.checkout)

    def step(self, name: str, action) -> None:
        try:
            action(self)
        except Exception as error:  # noqa: BLE001  (reported by the test that checks this step)
            self.errors[name] = f"{type(error).__name__}: {error}"

    def check(self, *steps: str) -> None:
        failed = {step: self.errors[step] for step in steps if step in self.errors}
        assert not failed, "\n".join(f"{step}: {error}" for step, error in failed.items())


def tasks() -> list[dict[str, str]]:
    """The server's tasks that should run now: node, image, state."""
    out = docker_on(
        1, "service", "ps", SERVER, "--filter", "desired-state=running", "--format", "{{json .}}"
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def running_nodes() -> list[str]:
    return sorted(t["Node"] for t in tasks() if t["CurrentState"].startswith("Running"))


def settled(count: int, *, avoid: str = "", image: str = "") -> bool:
    """`count` tasks should run and all of them run healthy (Swarm reports a task with a healthcheck
    Running once it passes), none on node `avoid`, all on `image`. (`service ls`'s REPLICAS column
    lags behind a drain or a lost node: it read 3/3 while one replica ran.)"""
    current = tasks()
    return (
        len(current) == count
        and all(t["CurrentState"].startswith("Running") for t in current)
        and all(t["Node"] != avoid for t in current)
        and all(t["Image"] == image or not image for t in current)
    )


def wait_for(what: str, ready, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:.0f} s")
        time.sleep(interval)


def node_ids() -> dict[str, str]:
    out = docker_on(
        1, "node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.Availability}}"
    ).stdout
    return {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()}


def server_containers() -> dict[str, str]:
    """container id -> node, for every running server replica on any node that answers."""
    found = {}
    for index in (1, 2, 3):
        result = docker_on(
            index,
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.swarm.service.name={SERVER}",
            check=False,
            timeout=30,
        )
        if result.returncode == 0:
            found.update({cid: f"{NAME}-node{index}" for cid in result.stdout.split()})
    return found


def _on_node(node: str) -> int:
    return int(node.rsplit("node", 1)[1])


def in_replica(cid: str, node: str, code: str) -> str:
    return docker_on(_on_node(node), "exec", cid, "python", "-c", code, timeout=60).stdout.strip()


def requests_by_node() -> dict[str, float]:
    read = (
        "import urllib.request as u; "
        "t = u.urlopen('http://localhost:9100/metrics', timeout=10).read()"
        ".decode(); print(sum(float(l.rsplit(' ', 1)[1]) for l in t.splitlines() "
        "if l.startswith('mnist_requests_total{')))"
    )
    totals: dict[str, float] = {}
    for cid, node in server_containers().items():
        totals[node] = totals.get(node, 0.0) + float(in_replica(cid, node, read))
    return totals


def replica_versions() -> dict[str, str]:
    """Each running replica's answer to Classify, the newest version, asked inside the replica."""
    ask = (
        "import numpy as np; from serving.client import ClassifierClient; "
        "c = ClassifierClient('localhost:8500'); "
        "print(c.classify(np.zeros((1, 28, 28, 1), np.float32)).model_version)"
    )
    return {cid: in_replica(cid, node, ask) for cid, node in server_containers().items()}


# --- steady callers through the entry point -------------------------------------------------------


@dataclass
class LoadResult:
    ok: int
    failed: int
    errors: list[str]
    latencies_ms: list[float]
    versions: dict[str, int]
    seconds: float

    @property
    def calls_per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("nan")


class SteadyLoad:
    """CALLERS threads, each with its own client (the project's, with its retries) to the entry
    point, calling Classify on one real MNIST test digit after another until stopped."""

    def __init__(self, images: np.ndarray, callers: int = CALLERS) -> None:
        self.images = images
        self.callers = callers
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.versions: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}  # version -> when it last answered (monotonic)
        self.threads = [
            threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(callers)
        ]

    def _caller(self, index: int) -> None:
        from serving.client import ClassifierClient

        with ClassifierClient(ENTRY, timeout=10) as client:
            position = index
            while not self.stop_event.is_set():
                image = self.images[position % len(self.images)][None, ..., None] / np.float32(255)
                position += self.callers
                started = time.perf_counter()
                try:
                    answer = client.classify(image.astype(np.float32))
                except Exception as error:  # noqa: BLE001  (every failure is counted and shown)
                    with self.lock:
                        self.errors.append(f"{type(error).__name__}: {str(error)[:200]}")
                    continue
                elapsed = (time.perf_counter() - started) * 1000
                with self.lock:
                    self.ok += 1
                    self.latencies.append(elapsed)
                    self.versions[answer.model_version] = (
                        self.versions.get(answer.model_version, 0) + 1
                    )
                    self.last_seen[answer.model_version] = time.monotonic()

    def __enter__(self) -> SteadyLoad:  # noqa: PYI034  (final in practice)
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.seconds = time.monotonic() - self.started

    def result(self) -> LoadResult:
        with self.lock:
            return LoadResult(
                self.ok,
                len(self.errors),
                list(self.errors[:20]),
                list(self.latencies),
                dict(self.versions),
                getattr(self, "seconds", time.monotonic() - self.started),
            )


def under_load(swarm: Swarm, name: str, event) -> LoadResult:
    """Steady callers for STEADY_S, then `event(swarm)` (it waits for its outcome), then STEADY_S."""
    with SteadyLoad(swarm.seen["images"]) as load:
        time.sleep(STEADY_S)
        started = time.monotonic()
        try:
            event(swarm)
        finally:
            swarm.figures[f"{name}_event_s"] = f"{time.monotonic() - started:.0f}"
            time.sleep(STEADY_S)
    result = load.result()
    swarm.seen[name] = result
    swarm.figures[f"{name}_calls"] = str(result.ok)
    swarm.figures[f"{name}_failed"] = str(result.failed)
    swarm.figures[f"{name}_p99_ms"] = f"{result.p99_ms:.0f}"
    return result


# --- the scenario ---------------------------------------------------------------------------------


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
            _run(
                "docker",
                "build",
                "-q",
                "-t",
                new,
                context,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
        _run("docker", "push", "-q", new, timeout=600)
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
    result = load.result()
    swarm.seen["new_model"] = result
    swarm.figures.update(
        {
            "new_model_calls": str(result.ok),
            "new_model_failed": str(result.failed),
            "new_model_p99_ms": f"{result.p99_ms:.0f}",
        }
    )
    # Envoy spreads the calls over every replica: once the old version answers no more, every
    # replica answers with the new one.
    old = str(current.version)
    reached = load.last_seen.get(old, swarm.seen["model_pushed_at"]) - swarm.seen["model_pushed_at"]
    swarm.seen["model_reached_all_s"] = reached
    swarm.figures["model_reached_all_replicas_s"] = f"{reached:.0f}"
    swarm.seen["replica_versions"] = replica_versions()


def _node_lost(swarm: Swarm) -> None:
    lost = f"{NAME}-node3"

    def lose(swarm: Swarm) -> None:
        swarm.seen["before_loss"] = running_nodes()
        swarm.cli("kill-node", "3", timeout=120)
        wait_for(f"{lost} Down", lambda: node_ids().get(lost, "").startswith("Down"), timeout=120)
        wait_for(
            "3 healthy replicas on the other nodes", lambda: settled(3, avoid=lost), timeout=300
        )

    under_load(swarm, "node_lost", lose)
    swarm.seen["after_loss"] = running_nodes()
    swarm.cli("revive-node", "3", timeout=300)
    wait_for(
        f"{lost} Ready again", lambda: node_ids().get(lost, "").startswith("Ready"), timeout=180
    )
    swarm.seen["revived"] = node_ids()[lost]


def _drain(swarm: Swarm) -> None:
    drained = f"{NAME}-node2"

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


def _down(swarm: Swarm) -> None:
    started = time.monotonic()
    swarm.seen["down_log"] = swarm.cli("down", timeout=600).stdout
    swarm.figures["down_s"] = f"{time.monotonic() - started:.0f}"
    swarm.seen["leftovers"] = _leftovers(swarm)


def _leftovers(swarm: Swarm) -> list[str]:
    """What `down` must have removed, found by the names `up` gives things."""
    found = []
    namespaces = _run("ip", "netns", "list", check=False).stdout.split()
    found += [f"netns {ns}" for ns in namespaces if ns.startswith(NAME)]
    links = _run("ip", "-o", "link", "show", check=False).stdout
    found += [
        f"link {line.split(':')[1].strip()}"
        for line in links.splitlines()
        if line.split(":")[1].strip().split("@")[0].startswith(NAME)
    ]
    rules = _run("iptables", "-S", check=False).stdout
    found += [f"iptables {line}" for line in rules.splitlines() if NAME in line]
    for path in (
        Path("/etc/docker/certs.d") / swarm.registry,
        Path("/var/lib") / NAME,
        Path("/run") / NAME,
    ):
        if path.exists():
            found.append(str(path))
    images = _run("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    found += [f"image {image}" for image in images if image.startswith(swarm.registry)]
    listening = _run("ss", "-Hltn", check=False).stdout if shutil.which("ss") else ""
    found += [
        f"listening {line.split()[3]}"
        for line in listening.splitlines()
        if line.split()[3] == swarm.registry
    ]
    return found


@pytest.fixture(scope="module")
def swarm(trained_repository, mnist_test_set, tmp_path_factory):
    problem = _problem()
    if problem:
        message = f"{problem}: the swarm tests make a 3-node Docker Swarm on this machine"
        if CI:
            pytest.fail(
                message + "; under CI=true they must run (.ci/run installs and starts them)"
            )
        pytest.skip(message)
    checkout = Path(tempfile.mkdtemp(prefix="mnist-swarm-"))
    repository = tmp_path_factory.mktemp("swarm") / "model_repository"
    shutil.copytree(trained_repository / "mnist", repository / "mnist")
    images, labels = mnist_test_set
    swarm = Swarm(checkout, f"swarmtest{uuid.uuid4().hex[:8]}", free_port(), repository)
    swarm.seen["test_set"] = (images, labels)
    swarm.seen["images"] = images[:2000]
    try:
        clean_checkout(checkout)
        swarm.cli("down", timeout=300)  # a cluster a killed run left behind
        started = time.monotonic()
        up = swarm.cli("up", "--model-repository", str(repository), timeout=1800)
        swarm.figures["up_s"] = f"{time.monotonic() - started:.0f}"
        swarm.seen["up_log"] = up.stdout
        for name, action in SCENARIO:
            swarm.step(name, action)
        swarm.step("down", _down)
        yield swarm
    finally:
        if "down_log" not in swarm.seen:
            swarm.cli("down", timeout=600)
        for target in ("server", "envoy", "locust"):
            _run(
                "docker",
                "rmi",
                "--no-prune",
                f"mnist-cnn-serving-{target}:{swarm.tag}",
                check=False,
            )
        shutil.rmtree(checkout, ignore_errors=True)
        print(
            "\nswarm figures (2 shared cores: spread and loss, not capacity): "
            + ", ".join(f"{key}={value}" for key, value in swarm.figures.items())
        )


# --- the promises ---------------------------------------------------------------------------------


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
    lost = f"{NAME}-node3"
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
    drained = f"{NAME}-node2"
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


def test_tls_override_hands_certificates_and_token_as_secrets(tmp_path):
    """deploy/swarm/stack.tls.yml merged on stack.yml as `docker stack deploy -c -c` merges it."""
    if shutil.which("docker") is None:
        if CI:
            pytest.fail("no docker client: under CI=true this test must run")
        pytest.skip("no docker client on PATH (docker stack config renders the stack)")
    certs = tmp_path / "certs"
    _run(sys.executable, str(ROOT / "docker" / "make-dev-certs.py"), "--out", str(certs))
    env = {
        **os.environ,
        "CERTS_DIR": str(certs),
        "REGISTRY": "registry.example:5000",
        "MODEL_REGISTRY": "https://registry.example:5000",
    }
    rendered = _run(
        "docker",
        "stack",
        "config",
        "-c",
        str(ROOT / "deploy/swarm/stack.yml"),
        "-c",
        str(ROOT / "deploy/swarm/stack.tls.yml"),
        env=env,
    ).stdout
    import yaml

    stack = yaml.safe_load(rendered)
    services = stack["services"]
    files = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key", "token")
    targets = {
        name: {s.get("target") for s in service.get("secrets", [])}
        for name, service in services.items()
    }
    assert {f"/certs/{f}" for f in files} <= targets["server"]
    assert {f"/certs/{f}" for f in files if f != "token"} <= targets["envoy"]
    assert {"/certs/ca.crt", "/certs/client.crt", "/certs/client.key", "/certs/token"} <= targets[
        "locust"
    ]
    server = services["server"]
    assert server["environment"]["MNIST_SERVE_TLS_CLIENT_CA"] == "/certs/ca.crt"
    assert server["environment"]["MNIST_SERVE_AUTH_TOKEN_FILE"] == "/certs/token"
    assert "--tls-cert /certs/client.crt" in server["environment"]["PROBE_TLS_ARGS"]
    # One probe command, not the base's and the override's concatenated.
    assert (
        server["healthcheck"]["test"][0] == "CMD-SHELL" and len(server["healthcheck"]["test"]) == 2
    )
    assert services["envoy"]["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy-tls.yaml"]
    assert stack["configs"]["envoy_tls"]["file"] == str(ROOT / "deploy/compose/envoy-tls.yaml")
    assert "--auth-token-file" in services["locust"]["command"]
    for name in ("ca_crt", "server_key", "token"):
        assert Path(stack["secrets"][name]["file"]).parent == certs
    # Every service stays off IPVS: dnsrr, host-mode ports.
    for name, service in services.items():
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        assert all(port["mode"] == "host" for port in service.get("ports", [])), name


# --- model_sync.py against a real registry (no engine needed) ---------------------------------------


def _model_sync():
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_sync", ROOT / "deploy/swarm/model_sync.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _push_model_image(base: str, name: str, tag: str, files: dict[str, bytes]) -> None:
    """A model image pushed through the Registry HTTP API, as `docker push` sends one."""
    import gzip
    import hashlib
    import urllib.request

    def upload(blob: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        start = urllib.request.Request(f"{base}/v2/{name}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=30) as answer:
            location = answer.headers["Location"]
        location = location if location.startswith("http") else base + location
        joiner = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{joiner}digest={digest}",
            data=blob,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(put, timeout=30).close()
        return digest

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    layer_blob = gzip.compress(layer.getvalue())
    config_blob = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config_blob),
                "digest": upload(config_blob),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer_blob),
                    "digest": upload(layer_blob),
                }
            ],
        }
    ).encode()
    put = urllib.request.Request(
        f"{base}/v2/{name}/manifests/{tag}",
        data=manifest,
        method="PUT",
        headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    urllib.request.urlopen(put, timeout=30).close()


def test_model_sync_fetches_checked_versions_and_refuses_an_altered_one(
    trained_repository, tmp_path
):
    """deploy/swarm/model_sync.py against Debian's docker-registry on loopback: a version whose
    model.onnx matches metadata.json's sha256 lands in the repository; one that does not is refused
    and never appears there, and the sync keeps the good one."""
    if shutil.which("docker-registry") is None:
        if CI:
            pytest.fail(
                "no docker-registry: under CI=true this test must run (.ci/run installs it)"
            )
        pytest.skip("no docker-registry on PATH (Debian: apt-get install docker-registry)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "store")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    registry = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the registry", lambda: _answers(base), timeout=60, interval=0.3)
        version_dir = trained_repository / "mnist" / "1"
        onnx = (version_dir / "model.onnx").read_bytes()
        metadata = (version_dir / "metadata.json").read_text()
        _push_model_image(
            base,
            "mnist-model",
            "1",
            {
                "mnist/1/model.onnx": onnx,
                "mnist/1/metadata.json": metadata.encode(),
                "mnist/config.pbtxt": (trained_repository / "mnist" / "config.pbtxt").read_bytes(),
            },
        )
        altered = bytearray(onnx)
        altered[-1] ^= 0xFF  # one flipped byte: the sha256 in metadata.json no longer matches
        _push_model_image(
            base,
            "mnist-model",
            "2",
            {
                "mnist/2/model.onnx": bytes(altered),
                "mnist/2/metadata.json": metadata.replace('"version": 1', '"version": 2').encode(),
            },
        )
        sync = _model_sync()
        into = tmp_path / "models"
        settings = sync.SyncConfig(base, "mnist-model", into)
        client = sync.Registry(settings)
        assert client.tags() == [1, 2]
        with pytest.raises(sync.RepositoryError, match="does not match metadata.json"):
            sync.sync_once(settings, client)
        assert (into / "mnist" / "1" / "model.onnx").read_bytes() == onnx
        assert (into / "mnist" / "config.pbtxt").exists()
        assert not (into / "mnist" / "2").exists()
        assert [p.name for p in into.iterdir() if p.name.startswith(".sync-")] == []
    finally:
        registry.terminate()
        registry.wait(timeout=30)


def _answers(base: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{base}/v2/", timeout=2).close()
        return True
    except OSError:
        return False
