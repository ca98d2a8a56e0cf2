"""One heavy decoding caller beside ordinary ones: does it cost the others their latency?

    python -m bench.heavy_decode --model-repository model_repository [--seconds 15]

Ordinary callers send one-image Classify calls back to back (bench.common's closed loop); their
p50/p99 are measured alone, then beside a caller that sends Classify with 64 encoded 4096x4096
RGBA PNGs (75 KB each, 1.07 billion pixels once decoded), one at a time and at most two a second:
first on a server with the default --max-decoded-pixels (the call is refused from the image
headers), then on one whose budget admits it, so the images are really decoded, on the decoding
threads, off the event loop.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from bench.common import CLASSIFY, ROOT, percentile_ms, require_test_images
from bench.common import measure as bench_measure
from serving.client import ClassifierClient
from serving.generated import mnist_classifier_pb2 as pb
from serving.process import start_server

SIDE = 4096


def big_png() -> bytes:
    image = Image.new("RGBA", (SIDE, SIDE), (255, 255, 255, 255))
    ImageDraw.Draw(image).line([(2048, 600), (2048, 3500)], fill=(0, 0, 0, 255), width=300)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def heavy_caller(target: str, heavy: bytes, outcomes, interval: float) -> None:
    """In a process of its own: its 4.7 MB messages must not hold the ordinary callers' GIL.

    One call at a time, at most one per `interval` seconds: the heavy call of issue 14, repeated,
    not a flood of 4.7 MB messages (that is overload, measured by bench.overload).
    """
    request = pb.ClassifyRequest(images=[pb.Image(encoded=heavy)] * 64)
    with ClassifierClient(target, timeout=600) as client:
        while True:
            started = time.monotonic()
            try:
                client._classifier.Classify(request, timeout=600)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


def classify_payloads(images: np.ndarray) -> list[bytes]:
    """One serialized one-image Classify request (raw pixels) per image: the ordinary calls."""
    return [
        pb.ClassifyRequest(images=[pb.Image(raw_pixels=image.tobytes())]).SerializeToString()
        for image in images
    ]


def measure(
    target: str,
    images: np.ndarray,
    callers: int,
    seconds: float,
    heavy: bytes | None,
    interval: float = 0.5,
) -> dict:
    """The ordinary callers' latency over `seconds` (bench.common's closed loop, in this process),
    with the heavy caller in a process of its own beside them when `heavy` is given."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs gRPC threads
    manager = context.Manager()
    outcomes = manager.dict()
    process = None
    if heavy is not None:
        process = context.Process(target=heavy_caller, args=(target, heavy, outcomes, interval))
        process.start()
    sample = bench_measure(
        target,
        classify_payloads(images),
        callers=callers,
        seconds=seconds,
        method=CLASSIFY,
        timeout=60,
    )
    heavy_outcomes = dict(outcomes)
    if process is not None:  # an admitted heavy call outlives the measurement: stop its caller
        process.terminate()
        process.join()
    manager.shutdown()
    return {
        "calls": len(sample.latencies),
        "p50_ms": percentile_ms(sample.latencies, 50),
        "p99_ms": percentile_ms(sample.latencies, 99),
        "heavy": heavy_outcomes,
    }


CASES = (
    ("default budget (16.8 Mpx per call)", ()),
    (
        "budget admits it (--max-decoded-pixels 1.07 G)",
        ("--max-decoded-pixels", str(64 * SIDE * SIDE)),
    ),
)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heavy_decode", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument(
        "--decode-threads", type=int, default=1, help="the server's --decode-threads"
    )
    parser.add_argument(
        "--heavy-interval", type=float, default=0.5, help="seconds between two heavy calls' starts"
    )
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    images = require_test_images(parser, args.data_dir, 1000)
    heavy = big_png()
    print(
        f"ordinary: {args.callers} callers, 1 image per Classify; heavy: 64 x {SIDE}x{SIDE} RGBA "
        f"PNG ({len(heavy) // 1024} KB each) per call, one call at a time, "
        f"at most one per {args.heavy_interval:g} s; {args.seconds:g} s each"
    )
    print(f"{'server':<44} {'heavy caller':<28} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for name, extra in CASES:
        flags = ("--workers", "1", "--http-port", "0", "--decode-threads", str(args.decode_threads))
        with start_server(args.model_repository, *flags, *extra) as server:
            for label, blob in (("none", None), ("64 x 4096^2 PNG", heavy)):
                if blob is None and extra:
                    continue  # the baseline is the same server configuration's
                result = measure(
                    server.target, images, args.callers, args.seconds, blob, args.heavy_interval
                )
                outcomes = ", ".join(f"{k} {v}" for k, v in result["heavy"].items()) or "-"
                print(
                    f"{name:<44} {label + ' (' + outcomes + ')':<28} {result['calls']:>6} "
                    f"{result['p50_ms']:>7.2f} {result['p99_ms']:>7.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
