"""The local swarm's nodes: one dockerd per node inside its network namespace, node 1 the
manager (`docker swarm init`), the others joined as workers; a node lost and revived on demand,
and every node stopped however it was left."""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from swarm_cluster import Cluster, Node
from swarm_tools import docker, pid_of, run, say, stop_pid, wait_for


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
    pid = pid_of(node.pidfile)
    if pid:
        # The containers first, at once: dockerd would stop them one grace period each.
        ids = docker(node, "ps", "-aq", check=False, timeout=30).stdout.split()
        if ids:
            docker(node, "rm", "-f", *ids, check=False, timeout=120)
        stop_pid(pid, grace=30)
    kill_node(node)  # whatever is left: containerd, shims
    for cgroup in Path("/sys/fs/cgroup").glob(f"*/{node.netns}"):
        for child in sorted(cgroup.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                child.rmdir()
            except OSError:
                pass


def stop_nodes(cluster: Cluster) -> None:
    """Every node whose namespace or pidfile is there: its containers, daemon and cgroups."""
    running = [
        n
        for n in cluster.all_nodes()
        if Path(f"/run/netns/{n.netns}").exists() or n.pidfile.exists()
    ]
    if running:
        say(f"stop {', '.join(n.hostname for n in running)}")
        with ThreadPoolExecutor(len(running)) as pool:  # each waits for its daemon to exit
            list(pool.map(_stop_node, running))
