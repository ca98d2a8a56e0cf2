"""Replicas on loopback: real mnist-serve processes behind one round_robin client.

Calls spread over every replica; a replica that gets SIGTERM under load costs no failed call; and a
replica started later, found through DNS as a headless Service's new pod would be, gets calls once
the connections of the others reach --max-connection-age. Timing figures: bench/scaleout.py.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import yaml

from bench.scaleout import Load, Replica, ipv4_target, start_replica, start_replicas
from loadtest.locust_args import normalize_target
from loadtest.locust_report import read_stats_csv
from serving.client import ClassifierClient
from serving.process import free_port
from tests.support.common import ROOT
from tests.support.envoy import envoy_binary, start_envoy

ENVOY_CONFIG = ROOT / "deploy" / "compose" / "envoy.yaml"

CALLERS = 32
ONE_PROCESS = ("--workers", "1")  # a replica is one process here, as a pod per core would be


@pytest.fixture(scope="module")
def digits(mnist_test_set) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test_set
    return images[:500], labels[:500]


@pytest.fixture(scope="module")
def expected(trained_repository, digits, tmp_path_factory) -> np.ndarray:
    """What the trained model answers for each digit (every replica must answer the same)."""
    images, _ = digits
    replica = start_replica(
        trained_repository,
        "127.0.0.1",
        free_port(),
        *ONE_PROCESS,
        log_path=tmp_path_factory.mktemp("reference") / "server.log",
    )
    try:
        with ClassifierClient(replica.address, timeout=30) as client:
            return np.concatenate(
                [client.classify(images[i : i + 64]).labels for i in range(0, len(images), 64)]
            )
    finally:
        replica.stop()


@pytest.fixture
def replicas(trained_repository, tmp_path) -> Iterator[list[Replica]]:
    started = start_replicas(
        trained_repository, 3, "--grace-period", "10", *ONE_PROCESS, log_dir=tmp_path
    )
    yield started
    for replica in started:
        replica.stop()


def wait_for_calls(load: Load, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while load.calls() < count:
        assert time.monotonic() < deadline, f"only {load.calls()} calls in {timeout} s"
        time.sleep(0.05)


def test_round_robin_spreads_calls_over_every_replica(replicas, digits, expected):
    before = [replica.requests_total() for replica in replicas]
    with ClassifierClient(ipv4_target(replicas), timeout=30) as client:
        with Load(client, digits[0], expected, CALLERS) as load:
            wait_for_calls(load, 900)
        result = load.stop()
    assert not result.failures, result.failures[:5]
    served = [replica.requests_total() - start for replica, start in zip(replicas, before)]
    assert all(count > 0 for count in served), served
    assert max(served) <= 0.5 * sum(served), f"one replica took more than half the calls: {served}"


def test_sigterm_to_one_replica_under_load_fails_no_call(replicas, digits, expected):
    with ClassifierClient(ipv4_target(replicas), timeout=30) as client:
        with Load(client, digits[0], expected, CALLERS) as load:
            wait_for_calls(load, 300)
            exit_code = replicas[0].stop()
            after_exit = load.calls()
            others = [replica.requests_total() for replica in replicas[1:]]
            wait_for_calls(load, after_exit + 300)
        result = load.stop()
    assert exit_code == 0, replicas[0].log()
    assert "draining" in replicas[0].log()
    assert not result.failures, f"{len(result.failures)} failed calls, e.g. {result.failures[:5]}"
    assert all(replica.requests_total() > count for replica, count in zip(replicas[1:], others))


@pytest.mark.timeout(180)
def test_locust_users_balance_over_an_ipv4_target(replicas, mnist_path, tmp_path):
    target = ipv4_target(replicas)
    assert (
        normalize_target(target) == target
        and normalize_target("dns:///mnist:8500") == "dns:///mnist:8500"
    )
    before = [replica.requests_total() for replica in replicas]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.run",
            "--host",
            target,
            "--scenario",
            "single",
            "--users",
            "8",
            "--spawn-rate",
            "8",
            "--run-time",
            "4s",
            "--pool-size",
            "200",
            "--reports-dir",
            str(tmp_path),
            "--name",
            "replicas",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        env={**os.environ, "MNIST_DATA_DIR": str(mnist_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    total = read_stats_csv(tmp_path / "replicas_stats.csv")["Aggregated"]
    assert total.requests > 0 and total.failures == 0
    served = [replica.requests_total() - start for replica, start in zip(replicas, before)]
    assert all(count > 0 for count in served), served


# ---- a replica that starts later: DNS and --max-connection-age ----------------------------------


class FakeDns(threading.Thread):
    """A DNS server on 127.0.0.1 (UDP) that answers A queries for one name with a list it can change.

    It stands in for a headless Service's DNS record: gRPC's c-ares resolver asks it whenever the
    client re-resolves (`dns://127.0.0.1:<port>/<name>:<port>` names the DNS server to use).
    """

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.name = name
        self.addresses: list[str] = []
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._closing = threading.Event()

    def run(self) -> None:
        while not self._closing.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            self._sock.sendto(self._answer(query), peer)

    def close(self) -> None:
        self._closing.set()
        self.join(2)
        self._sock.close()

    def _answer(self, query: bytes) -> bytes:
        (query_id,) = struct.unpack("!H", query[:2])
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode().lower())
            offset += 1 + length
        qtype, _ = struct.unpack("!HH", query[offset + 1 : offset + 5])
        question = query[12 : offset + 5]
        answers = b""
        if qtype == 1 and ".".join(labels) == self.name:  # A record: every address, TTL 0
            self.queries += 1
            answers = b"".join(
                struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(a)
                for a in self.addresses
            )
        count = len(self.addresses) if answers else 0
        return struct.pack("!HHHHHH", query_id, 0x8180, 1, count, 0, 0) + question + answers


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    server = FakeDns("replicas.mnist.test")
    server.start()
    yield server
    server.close()


def test_a_replica_started_later_gets_calls_within_the_max_connection_age(
    trained_repository, digits, expected, dns, tmp_path
):
    max_age = 3.0
    port = free_port()
    args = (
        "--max-connection-age",
        str(max_age),
        "--max-connection-age-grace",
        "1",
        "--grace-period",
        "5",
        *ONE_PROCESS,
    )
    replicas = start_replicas(trained_repository, 3, *args, port=port, log_dir=tmp_path)
    try:
        dns.addresses = [replica.host for replica in replicas]
        target = f"dns://127.0.0.1:{dns.port}/{dns.name}:{port}"
        with ClassifierClient(target, timeout=30, min_resolution_interval=0.5) as client:
            with Load(client, digits[0], expected, 8) as load:
                wait_for_calls(load, 100)
                replicas.append(
                    start_replica(
                        trained_repository,
                        "127.0.0.4",
                        port,
                        *args,
                        log_path=tmp_path / "replica-4.log",
                    )
                )
                dns.addresses.append(
                    "127.0.0.4"
                )  # the new pod enters the headless Service's record
                added = time.monotonic()
                # Every connection closes within max_age (+10 % jitter) + its grace; the client then
                # re-resolves (at most every 0.5 s) and connects to the new address too.
                while replicas[3].requests_total() == 0:
                    assert time.monotonic() - added < 1.1 * max_age + 1 + 0.5 + 5, (
                        "the fourth replica got no call within the max connection age"
                    )
                    time.sleep(0.1)
            result = load.stop()
        assert not result.failures, result.failures[:5]
        assert dns.queries >= 2  # resolved at the start and again after a connection aged out
    finally:
        for replica in replicas:
            replica.stop()


# ---- the compose entry point: Envoy in front of the replicas ------------------------------------


def loopback_envoy_config(
    dns: FakeDns, listen_port: int, admin_port: int, upstream_port: int
) -> dict:
    """deploy/compose/envoy.yaml as it is, but on loopback ports, and `server` resolved by the fake DNS."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    (cluster,) = config["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "server",
        "port_value": 8500,
    }
    endpoint["endpoint"]["address"]["socket_address"] = {
        "address": dns.name,
        "port_value": upstream_port,
    }
    cluster["typed_dns_resolver_config"] = {
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": dns.port}}],
            "use_resolvers_as_fallback": False,
        },
    }
    return config


@pytest.fixture
def envoy_entry_point(dns, tmp_path) -> Iterator[tuple[str, int]]:
    """Envoy with the compose config on loopback: yields (its gRPC target, the replicas' port)."""
    binary = envoy_binary()
    listen_port, upstream_port = free_port(), free_port()
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(
        yaml.safe_dump(loopback_envoy_config(dns, listen_port, free_port(), upstream_port))
    )
    proc = start_envoy(binary, config_path, tmp_path / "envoy.log", concurrency=2)
    try:
        yield f"127.0.0.1:{listen_port}", upstream_port
    finally:
        proc.terminate()
        proc.wait(10)


def test_envoy_entry_point_balances_per_call_and_loses_no_call_to_a_draining_replica(
    trained_repository, digits, expected, dns, envoy_entry_point, tmp_path
):
    target, port = envoy_entry_point
    replicas = start_replicas(
        trained_repository, 3, "--grace-period", "10", *ONE_PROCESS, port=port, log_dir=tmp_path
    )
    try:
        dns.addresses = [replica.host for replica in replicas]
        # One plain host:port target, as a client outside compose would use: no client-side balancing.
        with ClassifierClient(target, timeout=30) as client:
            client.wait_until_ready(60)  # grpc.health.v1 through Envoy, from a replica
            before = [replica.requests_total() for replica in replicas]
            with Load(client, digits[0], expected, CALLERS) as load:
                wait_for_calls(load, 900)
                served = [
                    replica.requests_total() - start for replica, start in zip(replicas, before)
                ]
                exit_code = replicas[0].stop()
                wait_for_calls(load, load.calls() + 300)
            result = load.stop()
        assert all(count > 0 for count in served), served
        assert max(served) <= 0.5 * sum(served), (
            f"one replica took more than half the calls: {served}"
        )
        assert exit_code == 0
        assert not result.failures, (
            f"{len(result.failures)} failed calls, e.g. {result.failures[:5]}"
        )
    finally:
        for replica in replicas:
            replica.stop()
