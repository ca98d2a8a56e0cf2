"""A real multi-node Docker Swarm on one machine, for tests and demos (docs/swarm.md).

    python docker/local_swarm.py up   [--nodes 3] [--model-repository DIR] [--tag T] [--no-build]
    python docker/local_swarm.py down                  removes everything `up` made, even half made
    python docker/local_swarm.py publish-model DIR        a newer model version, to every replica

`up` makes, printing each step:
  * a bridge (10.213.0.1/24) and one network namespace per node, joined to it by a veth pair, each
    with a resolv.conf that refuses at once (no image pull waits on DNS); a DOCKER-USER rule that
    lets the bridge forward (Docker sets FORWARD's policy to DROP);
  * one dockerd per node inside its namespace, with its own data root, exec root, socket, pidfile,
    hostname and cgroup parent; `ip netns exec` remounts /sys, so the cgroup v1 hierarchies are
    mounted again first ("Devices cgroup isn't mounted" otherwise); node 1 runs `docker swarm init`,
    the others join as workers;
  * Debian's docker-registry (the Distribution registry) on the bridge, with TLS from
    docker/make-dev-certs.py, its CA in /etc/docker/certs.d/<address>/ where every daemon here (the
    host's and the nodes') looks for it: nodes pull images as a cluster's nodes do;
  * the images built on the host (server, envoy, locust: the Dockerfile, classic builder), pushed;
    the model's newest version pushed as a model image (FROM scratch: KServe's "modelcar");
  * deploy/swarm/stack.yml deployed as stack `mnist`; then it waits until every replica is healthy.

Everything is named after --name (default mnsw): namespaces mnsw1.., bridge mnsw0, state under
/var/lib/mnsw and /run/mnsw. `down` finds it all by those names, so it works after any failure.
Needs root, iproute2, iptables, docker.io (dockerd 20.10+), docker-registry, and the dev extra
(`cryptography`, for the certificates). The kernel needs no IPVS: the stack uses dnsrr and host
ports.

The jobs live beside this file: swarm_cluster.py (names and paths), swarm_network.py,
swarm_registry.py, swarm_nodes.py, swarm_stack.py (images, model image, the stack) and
swarm_tools.py; this file is the command line, `up` and `down`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from swarm_cluster import Cluster, ClusterError
from swarm_network import make_network, remove_network
from swarm_nodes import kill_node, make_nodes, revive_node, stop_nodes
from swarm_registry import remove_registry, start_registry
from swarm_stack import (
    build_and_push,
    deploy,
    newest_version,
    publish_model,
    untag_pushed,
    wait_healthy,
)
from swarm_tools import say


def up(cluster: Cluster, repository: Path, build: bool = True) -> None:
    started = time.monotonic()
    newest_version(repository)  # no model to publish: say so before making anything
    if cluster.state_dir.exists() or cluster.run_dir.exists():
        say(f"a cluster named {cluster.name} is left over: removing it first")
        down(cluster)
    cluster.state_dir.mkdir(parents=True)
    (cluster.state_dir / "cluster.json").write_text(json.dumps(cluster.__dict__))
    make_network(cluster)
    start_registry(cluster)
    make_nodes(cluster)
    build_and_push(cluster, build)
    publish_model(cluster, repository)
    deploy(cluster)
    wait_healthy(cluster)
    manager = cluster.manager
    say(
        f"up in {time.monotonic() - started:.0f} s. Entry point (Envoy on {manager.hostname}): "
        f"gRPC {manager.ip}:8500, HTTP http://{manager.ip}:8000; "
        f"docker -H {manager.host} service ls"
    )


def down(cluster: Cluster) -> None:
    """Remove everything `up` makes, whatever state it was left in; every step tolerates absence."""
    saved = cluster.state_dir / "cluster.json"
    if saved.exists():
        cluster = Cluster(**json.loads(saved.read_text()))
    say(f"removing cluster {cluster.name}")
    stop_nodes(cluster)
    remove_registry(cluster)
    remove_network(cluster)
    untag_pushed(cluster)
    say(f"remove {cluster.state_dir} and {cluster.run_dir}")
    shutil.rmtree(cluster.run_dir, ignore_errors=True)
    shutil.rmtree(cluster.state_dir, ignore_errors=True)
    say("removed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local_swarm.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--name", default=Cluster.name, help="prefix of everything made (default mnsw)"
    )
    parser.add_argument(
        "--subnet", default=Cluster.subnet, help="the bridge's /24 (default 10.213.0)"
    )
    parser.add_argument("--registry-port", type=int, default=Cluster.registry_port)
    parser.add_argument("--tag", default=Cluster.tag, help="the images' tag (default latest)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="make the cluster and deploy the stack")
    start.add_argument("--nodes", type=int, default=Cluster.nodes)
    start.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    start.add_argument(
        "--no-build", action="store_true", help="push the images already tagged --tag"
    )
    commands.add_parser("down", help="remove everything `up` made")
    model = commands.add_parser("publish-model", help="push a model version as a model image")
    model.add_argument("repository", type=Path)
    model.add_argument("--version", type=int, default=None, help="default: the newest")
    lose = commands.add_parser("kill-node", help="lose a node: its link down, its processes killed")
    lose.add_argument("index", type=int, help="1 is the manager")
    revive = commands.add_parser("revive-node", help="bring a killed node back (it rejoins)")
    revive.add_argument("index", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("local_swarm.py: needs root (network namespaces, iptables, dockerd)", file=sys.stderr)
        return 2
    cluster = Cluster(
        name=args.name,
        nodes=getattr(args, "nodes", Cluster.nodes),
        subnet=args.subnet,
        registry_port=args.registry_port,
        tag=args.tag,
    )
    saved = cluster.state_dir / "cluster.json"
    if args.command != "up" and saved.exists():  # the cluster as `up` made it
        cluster = Cluster(**json.loads(saved.read_text()))
    try:
        if args.command == "up":
            up(cluster, args.model_repository, build=not args.no_build)
        elif args.command == "down":
            down(cluster)
        elif args.command == "kill-node":
            say(f"lose {cluster.node(args.index).hostname}: link down, every process killed")
            kill_node(cluster.node(args.index))
        elif args.command == "revive-node":
            say(f"revive {cluster.node(args.index).hostname}")
            revive_node(cluster.node(args.index))
        else:
            publish_model(cluster, args.repository, args.version)
    except (ClusterError, subprocess.TimeoutExpired, OSError) as error:
        print(f"local_swarm.py {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
