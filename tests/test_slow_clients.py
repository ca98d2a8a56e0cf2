"""Slow and stuck clients on a real server: 500 connections on each port that send their headers
or bodies slowly (slowloris), never finish the HTTP/2 preface, or never read their answers.

While they hang on, ordinary callers of all three APIs get every answer. The server closes the
stalled connections within its documented limits (serving.connection_limits: --http-idle-timeout,
--http-body-timeout, --grpc-handshake-timeout, --grpc-keepalive-time/-timeout, and
--grpc-max-concurrent-streams, which its SETTINGS frame advertises), its file descriptors and
memory stay bounded meanwhile, and they come back down when the clients go. The limits are set
short here so the test waits seconds, not minutes; bench/slow_clients.py measures the ordinary
callers' latency under the same load.
"""

from __future__ import annotations

import time

from bench.slow_clients import (
    Trickle,
    close_all,
    closed_by_server,
    connect,
    grpc_metadata_request,
    infer_json,
    stuck_h2_reader,
)
from serving.memory import tree_open_fds, tree_rss_bytes
from serving.process import start_server
from tests.support.lifecycle import Load, wait_for

CONNECTIONS = 500
LIMITS = (
    "--workers",
    "1",
    "--http-idle-timeout",
    "3",
    "--http-body-timeout",
    "3",
    "--grpc-handshake-timeout",
    "3",
    "--grpc-keepalive-time",
    "2",
    "--grpc-keepalive-timeout",
    "2",
    "--grpc-max-concurrent-streams",
    "16",
    "--grpc-max-connection-idle",
    "30",
)
# What each stalled connection may cost the server, at most: its socket's kernel buffers are not in
# RSS; aiohttp's or grpc core's per-connection state and the 64 KiB the transport buffers are.
PER_CONNECTION_BYTES = 256 * 1024


def held_at_most(baseline: int, connections: int) -> int:
    """One fd per stalled connection over the baseline, with 10 % + 24 for what comes and goes
    beside them (the ordinary load's connections: a fresh clone's run saw 40 more than 500)."""
    return baseline + connections + connections // 10 + 24


def settled(pid: int, baseline: int, slack: int = 24) -> bool:
    return tree_open_fds(pid) <= baseline + slack


def open_stalled_connections(port: int, images) -> tuple[dict, dict, list]:
    """CONNECTIONS stalled REST connections: 200 slow heads and 150 slow bodies (each socket with
    what Trickle will send of it), and non-readers for the rest."""
    head = f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    body = infer_json(images[:64])
    slow_heads = {
        connect(port): (head + "Content-Type: application/json\r\n" * 50).encode()
        for _ in range(200)
    }
    slow_bodies = {}
    for _ in range(150):
        sock = connect(port)
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode())
        slow_bodies[sock] = body
    # Non-readers: pipelined requests whose answers are never read, with a small receive
    # window: 20 fetches of the page's 16 kB digit sprite, or (a few: inference costs CPU)
    # 4 calls of 64 images.
    infer = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sprite = f"GET /static/digits.png HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    non_readers = []
    for index in range(CONNECTIONS - len(slow_heads) - len(slow_bodies)):
        sock = connect(port, receive_buffer=4096)
        sock.sendall(infer * 4 if index % 15 == 0 else sprite * 20)
        non_readers.append(sock)
    return slow_heads, slow_bodies, non_readers


def test_rest_slowloris_slow_bodies_and_non_readers_are_bounded_and_released(
    trained_repository, mnist_test_set, tmp_path
):
    images, _ = mnist_test_set
    with start_server(trained_repository, *LIMITS, log_path=tmp_path / "server.log") as server:
        pid, port = server.proc.pid, server.http_port
        load = Load(server.target, server.http_url, images[:1000], callers=6).start()
        try:
            time.sleep(2)
            fds_before, rss_before = tree_open_fds(pid), tree_rss_bytes(pid)
            slow_heads, slow_bodies, non_readers = open_stalled_connections(port, images)
            trickle = Trickle({**slow_heads, **slow_bodies}).start()
            fds_held, rss_held = tree_open_fds(pid), tree_rss_bytes(pid)
            # The idle timeout closes the slow heads, the body timeout the slow bodies (with a 408).
            wait_for(
                lambda: all(closed_by_server(s) for s in slow_heads), 60, "the slow heads closed"
            )
            wait_for(
                lambda: all(closed_by_server(s) for s in slow_bodies), 60, "the slow bodies closed"
            )
            trickle.stop()
            time.sleep(1)
            fds_non_readers = tree_open_fds(pid)
            rss_non_readers = tree_rss_bytes(pid)
            close_all(non_readers)
            wait_for(lambda: settled(pid, fds_before), 60, "the server's fds back to before")
            time.sleep(1)
        finally:
            load.stop()
    close_all([*slow_heads, *slow_bodies])
    assert not load.failures, load.failures[:5]
    assert load.answers
    assert fds_held <= held_at_most(fds_before, CONNECTIONS), (fds_before, fds_held)
    assert fds_non_readers <= held_at_most(fds_before, len(non_readers)), (
        fds_before,
        fds_non_readers,
    )
    for rss in (rss_held, rss_non_readers):
        assert rss - rss_before <= CONNECTIONS * PER_CONNECTION_BYTES, (rss_before >> 20, rss >> 20)
    print(
        f"\nREST: {CONNECTIONS} stalled connections: server fds {fds_before} -> {fds_held} "
        f"(held) -> {fds_non_readers} (non-readers left) -> back; "
        f"RSS {rss_before / 2**20:.0f} -> {rss_held / 2**20:.0f}"
        f" MiB; {len(load.answers)} ordinary calls, 0 failed"
    )


def test_slow_bodies_get_408(trained_repository, mnist_test_set, tmp_path):
    images, _ = mnist_test_set
    with start_server(trained_repository, *LIMITS, log_path=tmp_path / "server.log") as server:
        sock = connect(server.http_port)
        body = infer_json(images[:4])
        sock.sendall(
            f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--http-body-timeout" in answer


# ---- gRPC: raw HTTP/2 (the h2 library; bench.slow_clients), since a gRPC client always reads ----


def test_grpc_stalled_handshakes_and_non_readers_are_bounded_and_released(
    trained_repository, mnist_test_set, tmp_path
):
    images, _ = mnist_test_set
    message = grpc_metadata_request()
    with start_server(trained_repository, *LIMITS, log_path=tmp_path / "server.log") as server:
        pid, port = server.proc.pid, server.port
        load = Load(server.target, server.http_url, images[:1000], callers=6).start()
        try:
            time.sleep(2)
            fds_before, rss_before = tree_open_fds(pid), tree_rss_bytes(pid)
            silent = [connect(port) for _ in range(200)]  # connect, then nothing at all
            slow_prefaces = {connect(port): b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" for _ in range(100)}
            readers = [stuck_h2_reader(port, message) for _ in range(CONNECTIONS - 300)]
            trickle = Trickle(slow_prefaces).start()
            fds_held, rss_held = tree_open_fds(pid), tree_rss_bytes(pid)
            wait_for(
                lambda: all(closed_by_server(s) for s in silent),
                60,
                "the silent connections closed",
            )
            wait_for(
                lambda: all(closed_by_server(s) for s in slow_prefaces),
                60,
                "the slow prefaces closed",
            )
            trickle.stop()
            # The stuck readers are never closed by the client: the keepalive ping goes unanswered.
            wait_for(
                lambda: settled(pid, fds_before),
                90,
                "the server's fds back to before (readers closed)",
            )
            time.sleep(1)
        finally:
            load.stop()
    close_all([*silent, *slow_prefaces, *(sock for sock, _ in readers)])
    assert not load.failures, load.failures[:5]
    assert load.answers
    assert {limit for _, limit in readers} == {
        16
    }  # --grpc-max-concurrent-streams, in the server's SETTINGS
    assert fds_held <= held_at_most(fds_before, CONNECTIONS), (fds_before, fds_held)
    assert rss_held - rss_before <= CONNECTIONS * PER_CONNECTION_BYTES, (
        rss_before >> 20,
        rss_held >> 20,
    )
    print(
        f"\ngRPC: {CONNECTIONS} stalled connections: server fds {fds_before} -> {fds_held} -> "
        f"released; RSS {rss_before / 2**20:.0f} -> {rss_held / 2**20:.0f} MiB; "
        f"{len(load.answers)} ordinary calls, 0 failed"
    )
