"""Where one local swarm lives (docker/local_swarm.py): every name, address and path of the
cluster and its nodes derives from --name, so `down` needs nothing else to find it all."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = ROOT / "deploy" / "swarm" / "stack.yml"
IMAGE_TARGETS = ("server", "envoy", "locust")
CERTS_D = Path("/etc/docker/certs.d")


class ClusterError(Exception):
    """A step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Cluster:
    """Where one local cluster lives. Every name derives from `name`: `down` needs nothing else."""

    name: str = "mnsw"
    nodes: int = 3
    subnet: str = "10.213.0"  # a /24: .1 the host's bridge (and the registry), .11.. the nodes
    registry_port: int = 5000
    stack: str = "mnist"
    tag: str = "latest"

    @property
    def bridge(self) -> str:
        return f"{self.name}0"

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def registry(self) -> str:
        return f"{self.host_ip}:{self.registry_port}"

    @property
    def state_dir(self) -> Path:
        return Path("/var/lib") / self.name

    @property
    def run_dir(self) -> Path:
        return Path("/run") / self.name

    def node(self, index: int) -> Node:
        return Node(self, index)

    def all_nodes(self) -> list[Node]:
        return [self.node(i) for i in range(1, self.nodes + 1)]

    @property
    def manager(self) -> Node:
        return self.node(1)

    def image(self, target: str, tag: str | None = None) -> str:
        return f"{self.registry}/mnist-cnn-serving-{target}:{tag or self.tag}"

    def stack_env(self) -> dict[str, str]:
        """The variables deploy/swarm/stack.yml reads."""
        return {
            "REGISTRY": self.registry,
            "IMAGE_TAG": self.tag,
            "MODEL_REGISTRY": f"https://{self.registry}",
            "MODEL_REGISTRY_CA": str(self.state_dir / "certs" / "ca.crt"),
            # The nodes share this machine's cores: one server process per replica.
            "SERVER_WORKERS": os.environ.get("SERVER_WORKERS", "1"),
        }


@dataclass(frozen=True)
class Node:
    cluster: Cluster
    index: int

    @property
    def netns(self) -> str:
        return f"{self.cluster.name}{self.index}"

    @property
    def hostname(self) -> str:
        return f"{self.cluster.name}-node{self.index}"

    @property
    def ip(self) -> str:
        return f"{self.cluster.subnet}.{10 + self.index}"

    @property
    def veth(self) -> str:
        return f"{self.netns}h"  # the host's end; the namespace's end is renamed eth0

    @property
    def data_root(self) -> Path:
        return self.cluster.state_dir / f"node{self.index}"

    @property
    def exec_root(self) -> Path:
        return self.cluster.run_dir / f"node{self.index}"

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.exec_root / "dockerd.pid"

    @property
    def log(self) -> Path:
        return self.cluster.state_dir / f"node{self.index}.log"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.netns}"
