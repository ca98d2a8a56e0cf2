"""The local swarm's registry: Debian's docker-registry (the Distribution registry) on the
bridge, with TLS from docker/make-dev-certs.py and its CA where every daemon here looks for it,
so the nodes pull images as a cluster's nodes do."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from swarm_cluster import CERTS_D, ROOT, Cluster, ClusterError
from swarm_tools import pid_of, run, say, stop_pid, wait_for


def _certificates(cluster: Cluster) -> Path:
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
    return certs


def _write_config(cluster: Cluster, certs: Path) -> Path:
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
    return config


def start_registry(cluster: Cluster) -> None:
    say(f"registry (Debian's docker-registry, TLS) on {cluster.registry}")
    if shutil.which("docker-registry") is None:
        raise ClusterError("docker-registry is not installed: apt-get install docker-registry")
    certs = _certificates(cluster)
    config = _write_config(cluster, certs)
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


def remove_registry(cluster: Cluster) -> None:
    """The registry stopped and the daemons' trust in it removed (its storage goes with the
    state folder)."""
    pid = pid_of(cluster.run_dir / "registry.pid")
    if pid:
        say("stop the registry")
        stop_pid(pid, grace=10)
    shutil.rmtree(CERTS_D / cluster.registry, ignore_errors=True)
