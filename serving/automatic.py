"""The settings `0` stands for (`--workers 0`, `--intra-op-threads 0`): what fits this machine."""

from __future__ import annotations

import dataclasses
import os

from serving.config import ServeConfig


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_automatic_settings(config: ServeConfig, cores: int | None = None) -> ServeConfig:
    """Fill in the automatic settings (0): workers and each worker's onnxruntime threads.

    Workers: one per core on the CPU; one on a GPU, where several processes would each hold a CUDA
    context and contend for one device. Threads for large batches: every core; a worker uses them
    only while the other workers idle (serving.inference.activity), else one thread.
    """
    cores = cores or usable_cores()
    explicit = config.model_control_mode == "explicit"
    if explicit and config.workers > 1:
        # A load or unload call reaches the one worker its connection landed on; the others would
        # differ.
        raise ValueError(
            "--model-control-mode explicit needs --workers 1 (a load/unload call reaches one worker "
            "only); use --model-control-mode poll with several workers"
        )
    workers = config.workers or (1 if explicit or _gpu_likely(config.device) else cores)
    threads = config.intra_op_threads or cores
    return dataclasses.replace(config, workers=workers, intra_op_threads=threads)


def _gpu_likely(device: str) -> bool:
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    from serving.inference.runtime import cuda_problem  # `auto`: the GPU, when CUDA can work here

    return cuda_problem() is None
