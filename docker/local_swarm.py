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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


# --- small tools ----------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[local-swarm] {message}", flush=True)


def run(
    *argv: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"`{' '.join(argv)}` exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-1500:]}"
        )
    return result


def docker(node: Node | None, *args: str, **kwargs) -> subprocess.CompletedProcess:
    host = ["-H", node.host] if node else []
    return run("docker", *host, *args, **kwargs)


def wait_for(what: str, ready, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _stop_pid(pid: int, grace: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cgroup_mounts() -> list[str]:
    """This host's cgroup v1 hierarchies: a mount command for each (cpu, memory, name=systemd...)."""
    options = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, opts, *_ = line.split()
        if fstype == "cgroup" and mountpoint.startswith("/sys/fs/cgroup/"):
            kept = [
                o
                for o in opts.split(",")
                if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec", "clone_children")
            ]
            options.append((mountpoint, ",".join(kept)))
    return [f"mkdir -p {mp} && mount -t cgroup -o {opts} cgroup {mp}" for mp, opts in options]


# --- the network ----------------------------------------------------------------------------------


def _forward_rule(cluster: Cluster) -> list[str]:
    chain = (
        "DOCKER-USER"
        if run("iptables", "-n", "-L", "DOCKER-USER", check=False).returncode == 0
        else "FORWARD"
    )
    return [
        chain,
        "-i",
        cluster.bridge,
        "-o",
        cluster.bridge,
        "-m",
        "comment",
        "--comment",
        cluster.name,
        "-j",
        "ACCEPT",
    ]


def make_network(cluster: Cluster) -> None:
    say(f"bridge {cluster.bridge} {cluster.host_ip}/24, {cluster.nodes} network namespaces")
    run("ip", "link", "add", cluster.bridge, "type", "bridge")
    run("ip", "addr", "add", f"{cluster.host_ip}/24", "dev", cluster.bridge)
    run("ip", "link", "set", cluster.bridge, "up")
    rule = _forward_rule(cluster)
    run("iptables", "-I", *rule)
    for node in cluster.all_nodes():
        run("ip", "netns", "add", node.netns)
        run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", f"{node.netns}n")
        run("ip", "link", "set", f"{node.netns}n", "netns", node.netns)
        run("ip", "link", "set", node.veth, "master", cluster.bridge, "up")
        inside = ("ip", "netns", "exec", node.netns)
        run(*inside, "ip", "link", "set", f"{node.netns}n", "name", "eth0")
        run(*inside, "ip", "addr", "add", f"{node.ip}/24", "dev", "eth0")
        run(*inside, "ip", "link", "set", "eth0", "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "route", "add", "default", "via", cluster.host_ip)
        # `ip netns exec` binds /etc/netns/<name>/resolv.conf over /etc/resolv.conf. The bridge's
        # address has no DNS server: a lookup is refused at once instead of waiting for a timeout.
        etc = Path("/etc/netns") / node.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {cluster.host_ip}\noptions timeout:1 attempts:1\n"
        )


# --- the registry ---------------------------------------------------------------------------------


def start_registry(cluster: Cluster) -> None:
    say(f"registry (Debian's docker-registry, TLS) on {cluster.registry}")
    if shutil.which("docker-registry") is None:
        raise ClusterError("docker-registry is not installed: apt-get install docker-registry")
    certs = cluster.state_dir / "certs"
    if not (certs / "ca.crt").exists():
        run(
            sys.executable,
            str(ROOT / "docker" / "make-dev-certs.py"),
            "--out",
            str(certs),
            "--san",
            cluster.host_ip,
            "--force",
        )
    storage = cluster.state_dir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = cluster.state_dir / "registry.yml"
    config.write_text(
        json.dumps(
            {  # YAML is a superset of JSON
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {
                    "filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True},
                },
                "http": {
                    "addr": cluster.registry,
                    "tls": {
                        "certificate": str(certs / "server.crt"),
                        "key": str(certs / "server.key"),
                    },
                },
            }
        )
    )
    # Every daemon on this machine (the host's, the nodes') trusts a registry by this file.
    trust = CERTS_D / cluster.registry
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(certs / "ca.crt", trust / "ca.crt")
    cluster.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cluster.state_dir / "registry.log", "ab") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (cluster.run_dir / "registry.pid").write_text(str(process.pid))
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"https://{cluster.registry}/v2/", timeout=2, context=context)
            return True
        except OSError:
            if process.poll() is not None:
                raise ClusterError(
                    f"docker-registry exited {process.returncode}: see "
                    f"{cluster.state_dir / 'registry.log'}"
                ) from None
            return False

    wait_for("the registry", answers, timeout=60, interval=0.5)


# --- the nodes ------------------------------------------------------------------------------------


def start_daemon(node: Node) -> None:
    """dockerd in the node's namespace (its own hostname, mounts, paths), once it answers."""
    for path in (node.data_root, node.exec_root):
        path.mkdir(parents=True, exist_ok=True)
    config = node.exec_root / "daemon.json"
    config.write_text("{}\n")  # not the host's /etc/docker/daemon.json
    dockerd = " ".join(
        [
            "exec dockerd",
            f"--config-file {config}",
            f"--data-root {node.data_root}",
            f"--exec-root {node.exec_root}",
            f"--pidfile {node.pidfile}",
            f"-H {node.host}",
            f"--cgroup-parent {node.cgroup_parent}",
            "--storage-driver overlay2",
            "--log-level warn",
            "--default-address-pool base=10.214.0.0/16,size=24",
        ]
    )
    script = " && ".join(
        [
            "mount -t tmpfs cgroup_root /sys/fs/cgroup",
            *_cgroup_mounts(),
            f"hostname {node.hostname}",
            dockerd,
        ]
    )
    with open(node.log, "ab") as log:
        subprocess.Popen(
            ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c", script],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    wait_for(
        f"dockerd of {node.hostname} (log: {node.log})",
        lambda: docker(node, "info", "--format", "{{.ServerVersion}}", check=False).returncode == 0,
        timeout=120,
    )


def make_nodes(cluster: Cluster) -> None:
    for node in cluster.all_nodes():
        say(f"node {node.hostname}: dockerd at {node.ip} ({node.socket})")
    with ThreadPoolExecutor(cluster.nodes) as pool:  # each daemon takes seconds to answer
        list(pool.map(start_daemon, cluster.all_nodes()))
    manager = cluster.manager
    say(f"swarm init on {manager.hostname}")
    docker(
        manager,
        "swarm",
        "init",
        "--advertise-addr",
        manager.ip,
        "--listen-addr",
        f"{manager.ip}:2377",
        "--default-addr-pool",
        "10.215.0.0/16",
    )
    token = docker(manager, "swarm", "join-token", "-q", "worker").stdout.strip()
    for node in cluster.all_nodes()[1:]:
        say(f"{node.hostname} joins as a worker")
        docker(
            node,
            "swarm",
            "join",
            "--token",
            token,
            "--advertise-addr",
            node.ip,
            f"{manager.ip}:2377",
        )
    wait_for(
        f"{cluster.nodes} nodes Ready",
        lambda: len(ready_nodes(cluster)) == cluster.nodes,
        timeout=120,
    )


def ready_nodes(cluster: Cluster) -> list[str]:
    out = docker(
        cluster.manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}", check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.endswith(" Ready")]


# --- images and the stack -------------------------------------------------------------------------


def build_and_push(cluster: Cluster, build: bool) -> None:
    env = {"DOCKER_BUILDKIT": "0"}  # the classic builder: BuildKit is missing here
    if build:
        say("base image (docker/build-standin-base.sh when python:3.11-slim cannot be pulled)")
        run("sh", str(ROOT / "docker" / "build-standin-base.sh"), timeout=900)
    for target in IMAGE_TARGETS:
        local = f"mnist-cnn-serving-{target}:{cluster.tag}"
        if build:
            say(f"build {local}")
            started = time.monotonic()
            run(
                "docker",
                "build",
                "-q",
                "--target",
                target,
                "-t",
                local,
                str(ROOT),
                env=env,
                timeout=1800,
            )
            say(f"  built in {time.monotonic() - started:.0f} s")
        say(f"push {cluster.image(target)}")
        run("docker", "tag", local, cluster.image(target))
        run("docker", "push", "-q", cluster.image(target), timeout=900)


def newest_version(repository: Path, model: str = "mnist") -> int:
    versions = sorted(int(p.name) for p in (repository / model).glob("*") if p.name.isdigit())
    if not versions:
        raise ClusterError(
            f"no version of {model} under {repository}: train one first "
            f"(make train, or mnist-train --out {repository})"
        )
    return versions[-1]


def build_model_image(
    repository: Path, image: str, version: int | None = None, model: str = "mnist"
) -> str:
    """One model version as an image (KServe's "modelcar" packaging): FROM scratch, holding
    <model>/config.pbtxt and <model>/<version>/{model.onnx, metadata.json}, tagged by the version.
    """
    version = version or newest_version(repository, model)
    source = repository / model / str(version)
    if not (source / "model.onnx").is_file():
        raise ClusterError(f"{source}/model.onnx is missing: publish a complete version")
    tagged = f"{image}:{version}"
    with tempfile.TemporaryDirectory() as context:
        target = Path(context) / model
        shutil.copytree(source, target / str(version))
        if (repository / model / "config.pbtxt").exists():
            shutil.copy(repository / model / "config.pbtxt", target / "config.pbtxt")
        (Path(context) / "Dockerfile").write_text(f"FROM scratch\nCOPY {model} /{model}\n")
        run(
            "docker",
            "build",
            "-q",
            "--label",
            f"org.opencontainers.image.version={version}",
            "-t",
            tagged,
            context,
            env={"DOCKER_BUILDKIT": "0"},
        )
    return tagged


def publish_model(cluster: Cluster, repository: Path, version: int | None = None) -> str:
    """The newest (or given) version of `mnist` in `repository`, pushed as a model image."""
    image = build_model_image(repository, f"{cluster.registry}/mnist-model", version)
    say(f"push model image {image}")
    run("docker", "push", "-q", image, timeout=600)
    return image


def deploy(cluster: Cluster, stack_file: Path = STACK_FILE) -> None:
    say(f"deploy {stack_file.relative_to(ROOT)} as stack {cluster.stack}")
    docker(
        cluster.manager,
        "stack",
        "deploy",
        "--prune",
        "-c",
        str(stack_file),
        cluster.stack,
        env=cluster.stack_env(),
        timeout=300,
    )


def services(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """service name -> (running, wanted) replicas (running counts healthy ones: Swarm starts a
    task with a healthcheck as `starting` and reports it running once healthy)."""
    out = docker(
        cluster.manager, "service", "ls", "--format", "{{.Name}} {{.Replicas}}", check=False
    ).stdout
    replicas = {}
    for line in out.splitlines():
        name, counts = line.split()[:2]
        wanted = int(counts.split("/")[1])
        # Not the REPLICAS column's count of running ones: it lags (it read 3/3 while a drain had
        # left one replica running). The tasks that should run, and run, are counted here.
        states = docker(
            cluster.manager,
            "service",
            "ps",
            name,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.CurrentState}}",
            check=False,
        ).stdout.splitlines()
        running = sum(state.startswith("Running") for state in states)
        replicas[name] = (running if len(states) == wanted else min(running, wanted - 1), wanted)
    return replicas


def wait_healthy(cluster: Cluster, timeout: float = 600) -> None:
    def healthy() -> bool:
        current = services(cluster)
        return bool(current) and all(running == wanted for running, wanted in current.values())

    deadline = time.monotonic() + timeout
    shown = ""
    while not healthy():
        line = ", ".join(f"{name} {r}/{w}" for name, (r, w) in sorted(services(cluster).items()))
        if line != shown:
            say(f"waiting: {line}")
            shown = line
        if time.monotonic() > deadline:
            raise ClusterError(
                f"replicas not healthy after {timeout:.0f} s: {line}; "
                f"`docker -H {cluster.manager.host} service ps {cluster.stack}_server`"
            )
        time.sleep(2)
    line = ", ".join(f"{name} {r}/{w}" for name, (r, w) in sorted(services(cluster).items()))
    say(f"healthy: {line}")


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


# --- teardown -------------------------------------------------------------------------------------


def kill_node(node: Node) -> None:
    """The node is lost: its link goes down, then every process of it is killed (SIGKILL)."""
    run("ip", "link", "set", node.veth, "down", check=False)
    pids = set(run("ip", "netns", "pids", node.netns, check=False).stdout.split())
    for procs in Path("/sys/fs/cgroup/pids").glob(f"{node.netns}/*/cgroup.procs"):
        pids.update(procs.read_text().split())
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def revive_node(node: Node) -> None:
    """A lost node comes back: link up, its daemon started again (it rejoins the swarm itself)."""
    run("ip", "link", "set", node.veth, "up")
    start_daemon(node)


def _stop_node(node: Node) -> None:
    pid = _pid(node.pidfile)
    if pid:
        # The containers first, at once: dockerd would stop them one grace period each.
        ids = docker(node, "ps", "-aq", check=False, timeout=30).stdout.split()
        if ids:
            docker(node, "rm", "-f", *ids, check=False, timeout=120)
        _stop_pid(pid, grace=30)
    kill_node(node)  # whatever is left: containerd, shims
    for cgroup in Path("/sys/fs/cgroup").glob(f"*/{node.netns}"):
        for child in sorted(cgroup.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                child.rmdir()
            except OSError:
                pass


def down(cluster: Cluster) -> None:
    """Remove everything `up` makes, whatever state it was left in; every step tolerates absence."""
    saved = cluster.state_dir / "cluster.json"
    if saved.exists():
        cluster = Cluster(**json.loads(saved.read_text()))
    say(f"removing cluster {cluster.name}")
    running = [
        n
        for n in cluster.all_nodes()
        if Path(f"/run/netns/{n.netns}").exists() or n.pidfile.exists()
    ]
    if running:
        say(f"stop {', '.join(n.hostname for n in running)}")
        with ThreadPoolExecutor(len(running)) as pool:  # each waits for its daemon to exit
            list(pool.map(_stop_node, running))
    for node in cluster.all_nodes():
        run("ip", "netns", "del", node.netns, check=False)
        shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
        run("ip", "link", "del", node.veth, check=False)
    pid = _pid(cluster.run_dir / "registry.pid")
    if pid:
        say("stop the registry")
        _stop_pid(pid, grace=10)
    rule = _forward_rule(cluster)
    while run("iptables", "-D", *rule, check=False).returncode == 0:
        pass
    if run("ip", "link", "show", cluster.bridge, check=False).returncode == 0:
        say(f"remove bridge {cluster.bridge}")
        run("ip", "link", "del", cluster.bridge, check=False)
    shutil.rmtree(CERTS_D / cluster.registry, ignore_errors=True)
    pushed = run(
        "docker", "images", "--format", "{{.Repository}}:{{.Tag}}", check=False
    ).stdout.split()
    pushed = [image for image in pushed if image.startswith(f"{cluster.registry}/")]
    if pushed:
        say(f"untag {len(pushed)} pushed images on this host")
        run("docker", "rmi", "--no-prune", *pushed, check=False, timeout=300)
    say(f"remove {cluster.state_dir} and {cluster.run_dir}")
    shutil.rmtree(cluster.run_dir, ignore_errors=True)
    shutil.rmtree(cluster.state_dir, ignore_errors=True)
    say("removed")


# --- the command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
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
