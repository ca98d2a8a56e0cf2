"""Ordinary callers' latency beside slow and stuck clients: quiet, then 500 stalled connections on
the REST port, then 500 on the gRPC port.

    python -m bench.slow_clients [--model-repository DIR] [--seconds 10] [--connections 500]

Ordinary callers: `--callers` closed-loop one-image Classify calls over gRPC (bench.common) and as
many one-image KServe v2 REST calls. Stalled REST connections: 40 % send their request head a
byte every half second (slowloris), 30 % their body, 30 % pipeline requests and never read the
answers. Stalled gRPC connections: 40 % connect and send nothing, 20 % send the HTTP/2 preface a
byte at a time, 40 % open as many calls as the server allows (SETTINGS_MAX_CONCURRENT_STREAMS)
with a zero receive window and never read. The server runs with its defaults, so the stalled
connections stay for the whole window (its timeouts are longer than it); the figures are the
ordinary callers' p50/p99 in each phase and their ratio to the quiet run. The stall helpers are
also what tests/test_slow_clients.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ---- stalled clients ----


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
        )  # before connect: the window
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (EOF or reset), reading what it sent first."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:  # ECONNRESET
        return True
    finally:
        sock.setblocking(True)


def close_all(sockets) -> None:
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass


class Trickle:
    """Sends each connection's next byte every `interval` seconds, all on one thread."""

    def __init__(self, sockets: dict[socket.socket, bytes], interval: float = 0.5) -> None:
        self.pending = dict(sockets)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for sock, rest in list(self.pending.items()):
                if not rest:
                    continue
                try:
                    sock.send(rest[:1])
                    self.pending[sock] = rest[1:]
                except OSError:  # closed by the server
                    self.pending[sock] = b""


def infer_json(images: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(images), 28, 28, 1],
                    "datatype": "UINT8",
                    "data": images.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()


def grpc_metadata_request(model: str = "mnist") -> bytes:
    """A gRPC-framed ModelMetadata call: an answer that costs the server no inference.

    ModelMetadataRequest is `string name = 1`, written by hand: a process may hold tritonclient's or
    serving.generated's copy of the inference.* messages, never both.
    """
    name = model.encode()
    message = b"\x0a" + bytes([len(name)]) + name
    return b"\x00" + struct.pack(">I", len(message)) + message


def stuck_h2_reader(port: int, message: bytes, max_streams: int = 64) -> tuple[socket.socket, int]:
    """An HTTP/2 connection that opens as many ModelMetadata calls as the server allows, with a
    zero receive window, then never reads.

    Returns the socket and the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    """
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    sock = connect(port, receive_buffer=4096)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    conn.update_settings(
        {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )  # the server cannot send DATA
    sock.sendall(conn.data_to_send())
    limit = None
    while limit is None:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                )
                limit = changed.new_value if changed else 2**31
        sock.sendall(conn.data_to_send())
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/inference.GRPCInferenceService/ModelMetadata"),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    for _ in range(min(limit, max_streams)):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, message, end_stream=True)
    sock.sendall(conn.data_to_send())
    return sock, limit


def stall_rest(port: int, count: int, images: np.ndarray) -> tuple[list[socket.socket], Trickle]:
    head = f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    body = infer_json(images[:64])
    heads = {
        connect(port): (head + "Content-Type: application/json\r\n" * 50).encode()
        for _ in range(count * 4 // 10)
    }
    bodies = {}
    for _ in range(count * 3 // 10):
        sock = connect(port)
        sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode())
        bodies[sock] = body
    sprite = f"GET /static/digits.png HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    readers = []
    for _ in range(count - len(heads) - len(bodies)):
        sock = connect(port, receive_buffer=4096)
        sock.sendall(sprite * 20)
        readers.append(sock)
    return [*heads, *bodies, *readers], Trickle({**heads, **bodies}).start()


def stall_grpc(port: int, count: int) -> tuple[list[socket.socket], Trickle]:
    silent = [connect(port) for _ in range(count * 4 // 10)]
    prefaces = {connect(port): b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" for _ in range(count * 2 // 10)}
    message = grpc_metadata_request()
    readers = [
        stuck_h2_reader(port, message)[0] for _ in range(count - len(silent) - len(prefaces))
    ]
    return [*silent, *prefaces, *readers], Trickle(prefaces).start()


# ---- ordinary callers ----


def ordinary(server, images: np.ndarray, callers: int, seconds: float) -> dict[str, float]:
    """The ordinary callers' figures over `seconds`: gRPC Classify, then REST infer."""
    from bench.common import CLASSIFY, measure, percentile_ms, rest_closed_loop
    from serving.generated import mnist_classifier_pb2 as pb

    payload = pb.ClassifyRequest(
        images=[pb.Image(raw_pixels=images[0].tobytes())]
    ).SerializeToString()
    grpc_sample = measure(server.target, payload, callers=callers, seconds=seconds, method=CLASSIFY)
    rest_payload = (infer_json(images[:1]), {"Content-Type": "application/json"})
    rest = asyncio.run(
        rest_closed_loop(
            f"{server.http_url}/v2/models/mnist/infer",
            rest_payload,
            callers=callers,
            seconds=seconds,
            warmup=0,
            connection_per_caller=False,  # one aiohttp session, its pool, as most callers have
            timeout=30,
        )
    ).latencies
    return {
        "grpc_p50": percentile_ms(grpc_sample.latencies, 50),
        "grpc_p99": percentile_ms(grpc_sample.latencies, 99),
        "grpc_calls": len(grpc_sample.latencies),
        "grpc_errors": grpc_sample.errors,
        "rest_p50": percentile_ms(rest, 50),
        "rest_p99": percentile_ms(rest, 99),
        "rest_calls": len(rest),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--callers", type=int, default=4, help="ordinary callers on each API")
    parser.add_argument(
        "--connections", type=int, default=500, help="stalled connections per phase"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="the server's --workers (0: its default)"
    )
    return parser.parse_args(argv)


def measure_phases(server, images: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Quiet, REST stalled, gRPC stalled: the server's fds and RSS, the ordinary callers' figures."""
    from bench.common import server_rss_mib
    from serving.memory import tree_open_fds

    pid = server.proc.pid
    rows = []
    for phase in ("quiet", "REST stalled", "gRPC stalled"):
        sockets, trickle = ([], None)
        if phase == "REST stalled":
            sockets, trickle = stall_rest(server.http_port, args.connections, images)
        elif phase == "gRPC stalled":
            sockets, trickle = stall_grpc(server.port, args.connections)
        fds, rss = tree_open_fds(pid), server_rss_mib(pid)
        figures = ordinary(server, images, args.callers, args.seconds)
        rows.append({"phase": phase, "server_fds": fds, "server_rss_mib": rss, **figures})
        if trickle is not None:
            trickle.stop()
        close_all(sockets)
        time.sleep(2)
    return rows


def print_phases(rows: list[dict], args: argparse.Namespace) -> None:
    quiet = rows[0]
    print(
        f"ordinary callers: {args.callers} gRPC Classify + {args.callers} REST infer, one image "
        f"each, {args.seconds:g} s a phase; {args.connections} stalled connections "
        "(a shared machine: compare the ratios)"
    )
    print(
        f"{'phase':<13} {'fds':>5} {'RSS MiB':>8} {'gRPC p50/p99 ms':>16} {'x quiet':>7} "
        f"{'REST p50/p99 ms':>16} "
        f"{'x quiet':>7} {'gRPC errors':>11}"
    )
    for row in rows:
        print(
            f"{row['phase']:<13} {row['server_fds']:>5} {row['server_rss_mib']:>8.0f} "
            f"{row['grpc_p50']:>7.2f}/{row['grpc_p99']:<8.2f} "
            f"{row['grpc_p99'] / quiet['grpc_p99']:>7.2f} "
            f"{row['rest_p50']:>7.2f}/{row['rest_p99']:<8.2f} "
            f"{row['rest_p99'] / quiet['rest_p99']:>7.2f} "
            f"{row['grpc_errors']:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    from bench.common import test_images
    from serving.process import start_server

    args = parse_args(argv)
    images = np.ascontiguousarray(test_images()[:64])
    with start_server(
        args.model_repository, "--workers", str(args.workers), ready_timeout=300
    ) as server:
        rows = measure_phases(server, images, args)
    print_phases(rows, args)
    out = ROOT / "bench" / "results" / "slow_clients.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
