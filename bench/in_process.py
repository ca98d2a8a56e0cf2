"""The model's own ceiling: onnxruntime called in this process on make bench's batches, at
several thread settings, in slices interleaved with the servers' rounds."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import usable_cores
from core.contract import INPUT_NAME, to_model_input


def in_process(model_path: Path, batch: np.ndarray, seconds: float, threads: int | None) -> float:
    """Images/s of onnxruntime alone on `batch`; threads None: its defaults (all cores, spin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: to_model_input(batch)}
    for _ in range(20):
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def in_process_table(
    models: dict[str, Path], images: np.ndarray, seconds: float
) -> dict[str, dict[str, float]]:
    """{model: {"batch 64, 2 threads": images/s, ...}} over the thread settings worth trying."""
    cores = usable_cores()
    settings = {"1 thread": 1, f"{cores} threads": cores, "ORT default": None}
    return {
        name: {
            f"batch {n}, {label}": in_process(path, images[:n], seconds, threads)
            for n in (1, 64)
            for label, threads in settings.items()
        }
        for name, path in models.items()
    }


def interleaved_in_process_table(
    models: dict[str, Path], images: np.ndarray, seconds: float, rounds: int
):
    """in_process_table in `rounds` slices; returns (measure one slice, the averaged table)."""
    slices: list[dict[str, dict[str, float]]] = []

    def measure_slice() -> None:
        slices.append(in_process_table(models, images, seconds / rounds))

    def averaged() -> dict[str, dict[str, float]]:
        return {
            model: {
                label: statistics.fmean(s[model][label] for s in slices)
                for label in slices[0][model]
            }
            for model in slices[0]
        }

    return measure_slice, averaged


def best(table_: dict[str, float], batch: int) -> tuple[str, float]:
    return max(
        ((label, value) for label, value in table_.items() if label.startswith(f"batch {batch},")),
        key=lambda item: item[1],
    )
