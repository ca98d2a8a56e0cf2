"""The local swarm's network: a bridge on the host, one network namespace per node joined to it
by a veth pair, and the firewall rule that lets the bridge forward."""

from __future__ import annotations

import shutil
from pathlib import Path

from swarm_cluster import Cluster
from swarm_tools import run, say


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


def remove_network(cluster: Cluster) -> None:
    """The namespaces, veths, forward rule and bridge, whichever of them exist."""
    for node in cluster.all_nodes():
        run("ip", "netns", "del", node.netns, check=False)
        shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
        run("ip", "link", "del", node.veth, check=False)
    rule = _forward_rule(cluster)
    while run("iptables", "-D", *rule, check=False).returncode == 0:
        pass
    if run("ip", "link", "show", cluster.bridge, check=False).returncode == 0:
        say(f"remove bridge {cluster.bridge}")
        run("ip", "link", "del", cluster.bridge, check=False)
