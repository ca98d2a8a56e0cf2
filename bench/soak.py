"""Soak: correctness and memory over time under steady mixed load.

    make soak ARGS="--minutes 10"
    python -m bench.soak --model-repository model_repository --minutes 10 [--callers 16]
    python -m bench.soak --target host:8500 --minutes 60 [--server-pid PID]

Callers send Classify (raw pixels and PNG files) and KServe ModelInfer back to back. Every answer
is checked against the server's own idle answer for the same images, and a share of hostile calls
(malformed protobuf, oversized names, typed contents beside raw) must be refused with
INVALID_ARGUMENT or NOT_FOUND. Every --interval seconds one line: calls, errors, wrong answers,
calls/s and the server's RSS (read from /proc when the server runs on this machine). At the end a
summary and a plot (bench/results/soak.png). Exits 1 on any wrong answer, unexpected error, or
RSS that grew more than --max-rss-growth after the first interval.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.common import (
    ROOT,
    add_local_server_flags,
    idle_labels,
    largest_process_rss_mib,
    require_test_images,
    server_rss_mib,
)
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.memory import process_tree
from serving.process import start_server

HOSTILE_SHARE = 0.05  # of calls
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
HEADER = (
    f"{'t s':>6} {'calls':>9} {'calls/s':>8} {'errors':>6} {'wrong':>5} {'refused':>7} "
    f"{'RSS MB':>7} {'worker MB':>9}  (RSS: all the server's processes; worker: the largest one)"
)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    errors: int = 0
    wrong: int = 0
    hostile_refused: int = 0
    # RESOURCE_EXHAUSTED: the server shedding load, retried after a pause (not an error)
    shed: int = 0
    last_error: str = ""

    def add(
        self,
        *,
        calls: int = 0,
        errors: int = 0,
        wrong: int = 0,
        refused: int = 0,
        shed: int = 0,
        error: str = "",
    ) -> None:
        with self.lock:
            self.calls += calls
            self.errors += errors
            self.shed += shed
            self.wrong += wrong
            self.hostile_refused += refused
            self.last_error = error or self.last_error


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def hostile_request(rng: random.Random) -> bytes:
    """One of the hostile shapes of issue 14, serialized: each must be refused, quickly."""
    kind = rng.randrange(3)
    if kind == 0:  # not protobuf at all
        return b"\x0a\xff\xff\xff\xff\x0f"
    if kind == 1:  # a 64 KiB model name
        message = pb.ClassifyRequest(
            model_name="x" * 65536, images=[pb.Image(raw_pixels=bytes(784))]
        )
    else:  # raw pixels of the wrong size
        message = pb.ClassifyRequest(images=[pb.Image(raw_pixels=bytes(700))])
    return message.SerializeToString()


def hostile_call(channel: grpc.Channel, rng: random.Random) -> grpc.StatusCode:
    """One hostile call's status; the answer must be a refusal."""
    call = channel.unary_unary(
        "/mnist.v1.Classifier/Classify", request_serializer=None, response_deserializer=None
    )
    try:
        call(hostile_request(rng), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def caller(
    target: str,
    images: np.ndarray,
    reference: np.ndarray,
    blobs: list[bytes],
    stop: threading.Event,
    tally: Tally,
    seed: int,
) -> None:
    rng = random.Random(seed)
    with (
        ClassifierClient(target, timeout=30) as client,
        grpc.insecure_channel(target) as raw_channel,
    ):
        while not stop.is_set():
            try:
                if rng.random() < HOSTILE_SHARE:
                    code = hostile_call(raw_channel, rng)
                    ok = code in REFUSED
                    tally.add(
                        calls=1,
                        refused=int(ok),
                        errors=int(not ok),
                        error="" if ok else f"hostile call answered {code.name}",
                    )
                    continue
                start = rng.randrange(len(images) - 16)
                count = rng.choice((1, 4, 16))
                kind = rng.randrange(3)
                if kind == 0:
                    labels = client.classify(images[start : start + count]).labels
                elif kind == 1:
                    labels = client.infer_kserve(images[start : start + count]).argmax(axis=1)
                else:
                    labels = client.classify_encoded(blobs[start : start + count]).labels
                expected = reference[int(kind == 2)][
                    start : start + count
                ]  # PNGs have their own idle answers
                tally.add(calls=1, wrong=int((np.asarray(labels) != expected).sum()))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # shed: back off, as it asks
                    tally.add(calls=1, shed=1)
                    stop.wait(0.05)
                    continue
                tally.add(
                    calls=1, errors=1, error=f"{error.code().name}: {(error.details() or '')[:200]}"
                )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [row["t"] / 60 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(minutes, [row["calls_per_s"] for row in rows], "-")
    left.set_xlabel("minutes")
    left.set_ylabel("calls/s")
    left.set_title("throughput (errors and wrong answers: see the log)", fontsize=9)
    right.plot(minutes, [row["rss_mb"] for row in rows], "-", color="tab:red")
    right.set_xlabel("minutes")
    right.set_ylabel("server RSS (MB)")
    right.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between two report lines"
    )
    parser.add_argument("--target", help="a running server (default: start one on this machine)")
    parser.add_argument(
        "--server-pid", type=int, help="with --target: the server's pid, for its RSS"
    )
    add_local_server_flags(parser)
    parser.add_argument(
        "--max-shed",
        type=float,
        default=0.05,
        help="allowed share of calls shed with RESOURCE_EXHAUSTED (a loaded machine sheds some)",
    )
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=0.10,
        help="allowed RSS growth from the first interval to the end (fraction)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.callers < 1:
        parser.error("--minutes must be positive and --callers at least 1")
    return parser, args


def server_context(args):
    """The server under soak: args.target's (yields None), or one started on this machine."""
    if args.target:
        return nullcontext(None)
    return start_server(
        args.model_repository,
        "--workers",
        str(args.workers),
        log_path=args.out.with_suffix(".log"),
        ready_timeout=300,
    )


def interval_row(tally: Tally, pid: int | None, now: float, previous: int, interval: float):
    """One report line's figures: the tally so far, the last interval's rate, the server's RSS."""
    with tally.lock:
        calls, errors, wrong, refused = (
            tally.calls,
            tally.errors,
            tally.wrong,
            tally.hostile_refused,
        )
    alive = pid and Path(f"/proc/{pid}").exists()
    return {
        "t": now,
        "calls": calls,
        "calls_per_s": (calls - previous) / interval,
        "errors": errors,
        "wrong": wrong,
        "refused": refused,
        "rss_mb": server_rss_mib(pid),
        "worker_rss_mb": largest_process_rss_mib(pid),
        "processes": len(process_tree(pid)) if alive else 0,
    }


def report(rows: list[dict], tally: Tally, pid: int | None, args) -> None:
    """Every args.interval seconds until args.minutes are over: one row, printed and kept."""
    started = time.monotonic()
    previous = 0
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        time.sleep(min(args.interval, args.minutes * 60 - elapsed))
        row = interval_row(tally, pid, time.monotonic() - started, previous, args.interval)
        previous = row["calls"]
        rows.append(row)
        print(
            f"{row['t']:>6.0f} {row['calls']:>9} {row['calls_per_s']:>8.0f} {row['errors']:>6} "
            f"{row['wrong']:>5} {row['refused']:>7} "
            f"{row['rss_mb']:>7.0f} {row['worker_rss_mb']:>9.0f}",
            flush=True,
        )


def soak(target: str, pid: int | None, images: np.ndarray, blobs: list[bytes], args):
    """The idle answers, then args.callers callers for args.minutes: the tally and the rows."""
    with ClassifierClient(target, timeout=60) as client:  # what every later answer must equal
        reference = np.stack(
            [idle_labels(client.classify, images), idle_labels(client.classify_encoded, blobs)]
        )
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(
            target=caller,
            args=(target, images, reference, blobs, stop, tally, seed),
            daemon=True,
        )
        for seed in range(args.callers)
    ]
    for thread in threads:
        thread.start()
    rows: list[dict] = []
    print(f"soak: {args.callers} callers for {args.minutes:g} min against {target}")
    print(HEADER)
    try:
        report(rows, tally, pid, args)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return tally, rows


def summarize(tally: Tally, rows: list[dict], args) -> dict:
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (last - first) / first if first == first and first else 0.0  # NaN: remote, no RSS
    return {
        "minutes": args.minutes,
        "callers": args.callers,
        "calls": tally.calls,
        "errors": tally.errors,
        "wrong": tally.wrong,
        "hostile_refused": tally.hostile_refused,
        "shed": tally.shed,
        "rss_first_mb": first,
        "rss_last_mb": last,
        "rss_max_mb": max(r["rss_mb"] for r in rows),
        "rss_growth": growth,
        "worker_rss_max_mb": max(r["worker_rss_mb"] for r in rows),
        "processes": max(r["processes"] for r in rows),
        "last_error": tally.last_error,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    images = require_test_images(parser, args.data_dir, 1024)
    blobs = [png(image) for image in images]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with server_context(args) as server:
        target = args.target or server.target
        pid = args.server_pid if args.target else server.proc.pid
        tally, rows = soak(target, pid, images, blobs, args)
    summary = summarize(tally, rows, args)
    args.out.write_text(json.dumps(summary, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    s = summary
    print(
        f"{tally.calls} calls ({tally.hostile_refused} hostile, refused; {tally.shed} shed), "
        f"{tally.errors} errors, {tally.wrong} wrong answers; RSS of all {s['processes']} "
        f"server processes {s['rss_first_mb']:.0f} -> {s['rss_last_mb']:.0f} MB "
        f"({s['rss_growth']:+.1%}, max {s['rss_max_mb']:.0f}; largest worker "
        f"{s['worker_rss_max_mb']:.0f}); wrote {args.out} and {args.out.with_suffix('.png')}"
    )
    if tally.last_error:
        print(f"last error: {tally.last_error}")
    failed = (
        tally.errors
        or tally.wrong
        or s["rss_growth"] > args.max_rss_growth
        or tally.shed > args.max_shed * max(tally.calls, 1)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
