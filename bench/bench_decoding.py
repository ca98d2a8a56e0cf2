"""How long the server's input checks take, in-process: `python -m bench.bench_decoding`.

Moved out of the test suite (a speed check there fails on a busy machine and proves nothing about
correctness). The figure to watch: a raw 64-image Classify batch decodes in well under 1 ms.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from core.idx import find_data_dir, load_idx_dir
from serving.generated import mnist_classifier_pb2 as pb
from serving.inputs.wire import decode_classify_images

BUDGET_SECONDS = 1e-3  # the goal for a raw batch of 64


def best_of(function, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=200, help="timed runs per case; the best is reported"
    )
    args = parser.parse_args(argv)
    folder = find_data_dir("mnist")
    digits = (
        load_idx_dir(folder).test_images[:64]
        if folder is not None
        else np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    )
    raw = pb.ClassifyRequest(images=[pb.Image(raw_pixels=digit.tobytes()) for digit in digits])
    floats = pb.ClassifyRequest(
        images=[
            pb.Image(float_pixels=pb.FloatPixels(values=(digit / 255).ravel().tolist()))
            for digit in digits
        ]
    )
    cases = [
        ("raw_pixels x64", raw),
        ("float_pixels x64", floats),
        ("raw_pixels x1", pb.ClassifyRequest(images=raw.images[:1])),
    ]
    print(f"{'case':<18} {'best of ' + str(args.runs):>12}")
    results = {}
    for name, request in cases:
        results[name] = best_of(
            lambda: decode_classify_images(request.images, max_batch_size=64), args.runs
        )
        print(f"{name:<18} {results[name] * 1e6:>9.0f} us")
    ok = results["raw_pixels x64"] < BUDGET_SECONDS
    print(f"raw batch of 64 under {BUDGET_SECONDS * 1e3:.0f} ms: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
