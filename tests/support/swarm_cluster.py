"""The 3-node Docker Swarm tests/test_swarm.py makes with docker/local_swarm.py: its names, the
`docker -H` calls to its nodes, where the server's replicas run and what they answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.engine import engine_problem
from tests.support.scenario import Scenario

NAME = "mnswt"  # everything the cluster makes is named after it (make swarm-up uses mnsw)
SUBNET = "10.213.7"
MANAGER_IP = f"{SUBNET}.11"
ENTRY = f"{MANAGER_IP}:8500"
STACK = "mnist"
SERVER = f"{STACK}_server"


def problem() -> str | None:
    """Why the cluster cannot be made here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces, iptables, more dockerd daemons)"
    for tool in ("docker", "dockerd", "ip", "iptables", "docker-registry", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    return engine_problem()


def run(
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
    return run("docker", "-H", node_host(index), *args, **kwargs)


@dataclass
class Swarm(Scenario):
    """The cluster under test, run from the session's checkout on the session's images."""

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
        return run(*argv, timeout=timeout, cwd=self.checkout)


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


def on_node(node: str) -> int:
    return int(node.rsplit("node", 1)[1])


def in_replica(cid: str, node: str, code: str) -> str:
    return docker_on(on_node(node), "exec", cid, "python", "-c", code, timeout=60).stdout.strip()


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


def leftovers(swarm: Swarm) -> list[str]:
    """What `down` must have removed, found by the names `up` gives things."""
    found = []
    namespaces = run("ip", "netns", "list", check=False).stdout.split()
    found += [f"netns {ns}" for ns in namespaces if ns.startswith(NAME)]
    links = run("ip", "-o", "link", "show", check=False).stdout
    found += [
        f"link {line.split(':')[1].strip()}"
        for line in links.splitlines()
        if line.split(":")[1].strip().split("@")[0].startswith(NAME)
    ]
    rules = run("iptables", "-S", check=False).stdout
    found += [f"iptables {line}" for line in rules.splitlines() if NAME in line]
    for path in (
        Path("/etc/docker/certs.d") / swarm.registry,
        Path("/var/lib") / NAME,
        Path("/run") / NAME,
    ):
        if path.exists():
            found.append(str(path))
    images = run("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    found += [f"image {image}" for image in images if image.startswith(swarm.registry)]
    listening = run("ss", "-Hltn", check=False).stdout if shutil.which("ss") else ""
    found += [
        f"listening {line.split()[3]}"
        for line in listening.splitlines()
        if line.split()[3] == swarm.registry
    ]
    return found
