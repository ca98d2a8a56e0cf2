"""The onnxruntime session: provider choice (CUDA or CPU), threads, warm-up. Knows nothing of batching."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from core.contract import IMAGE_SHAPE, INPUT_DTYPE, INPUT_NAME, OUTPUT_NAME
from serving import tracing
from serving.inference import activity

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class DeviceUnavailable(RuntimeError):
    """--device cuda was asked for, but no usable GPU answered."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    warmup_runs: int = 3
    max_batch_size: int = 64
    allow_spinning: bool = False
    multi_thread_min_batch: int = 16  # smaller batches run on a one-thread session


class OnnxRuntimeSession:
    """Runs the classifier on float32 [N,28,28,1] and returns probabilities [N,10].

    Threads are sized to the batch with two sessions of the same model on the CPU: one with a
    single intra-op thread for small batches (a lone image is done before other threads would
    even wake up, and their wake-ups take the cores gRPC needs), one with `intra_op_threads`
    for batches of `multi_thread_min_batch` images or more, where splitting the convolutions
    pays. onnxruntime fixes a session's thread pool when it is created, so two sessions (a few
    hundred kB of weights each) are the way to choose per run. On CUDA one session does all.
    """

    def __init__(self, model_path: str, options: RuntimeOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._runs = 0  # runs in progress, on the batcher's threads
        self.session, self.provider, self.reason = _create_session(model_path, options)
        self._small = self.session
        if self.provider == CPU and options.intra_op_threads != 1:
            self._small = ort.InferenceSession(
                model_path,
                _session_options(dataclasses.replace(options, intra_op_threads=1)),
                providers=[CPU],
            )
        log.info(
            "onnxruntime %s on %s: %s; %s",
            ort.__version__,
            self.provider,
            self.reason,
            self.threading(),
        )

    def threading(self) -> str:
        if self._small is self.session:
            return f"one session, {self.options.intra_op_threads or 'default'} intra-op thread(s)"
        return (
            f"batches under {self.options.multi_thread_min_batch} images on 1 thread, larger on "
            f"{self.options.intra_op_threads or 'one per core'}"
        )

    def session_for(
        self, images: int, others_idle: bool, alone: bool = True
    ) -> ort.InferenceSession:
        """Large batches take every core only while the other --workers idle (inference.activity),
        and only when no other batch of this process runs (they would share the cores)."""
        return (
            self.session
            if alone and others_idle and images >= self.options.multi_thread_min_batch
            else self._small
        )

    def run(self, images: np.ndarray) -> np.ndarray:
        """Thread-safe: the batcher may run several batches at once, each on its own thread."""
        board = activity.current()
        with self._lock:
            self._runs += 1
            alone = self._runs == 1
        board.started()
        try:
            return self._run(images, self.session_for(len(images), board.others_idle(), alone))
        finally:
            board.finished()
            with self._lock:
                self._runs -= 1

    def _run(self, images: np.ndarray, session: ort.InferenceSession) -> np.ndarray:
        if tracing.on:  # a child of the batch span (none during warm-up)
            threads = 1 if session is not self.session else self.options.intra_op_threads
            with tracing.child(
                "onnxruntime.run",
                {
                    "onnxruntime.provider": self.provider,
                    "batch.size": len(images),
                    "onnxruntime.intra_op_threads": threads,
                },
            ):
                return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    def warm_up(self) -> None:
        """Run the sizes a server will meet first (both sessions) so no caller pays for lazy initialisation."""
        for _ in range(max(1, self.options.warmup_runs)):
            for batch in sorted({1, self.options.max_batch_size}):
                self.run(np.zeros((batch, *IMAGE_SHAPE), dtype=INPUT_DTYPE))


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = options.intra_op_threads
    settings.inter_op_num_threads = options.inter_op_threads
    settings.graph_optimization_level = _OPTIMIZATION[options.graph_optimization]
    if not options.allow_spinning:
        # Idle onnxruntime threads busy-wait by default, taking the cores gRPC needs between batches.
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        settings.add_session_config_entry("session.inter_op.allow_spinning", "0")
    settings.log_severity_level = 3  # errors only; the provider choice is logged by us
    return settings


def _create_session(
    model_path: str, options: RuntimeOptions
) -> tuple[ort.InferenceSession, str, str]:
    """Pick the provider: CUDA when asked or when `auto` finds it working, else the CPU."""
    settings = _session_options(options)
    if options.device == "cpu":
        return ort.InferenceSession(model_path, settings, providers=[CPU]), CPU, "--device cpu"
    problem = cuda_problem()
    if problem is None:
        session = ort.InferenceSession(model_path, settings, providers=[CUDA, CPU])
        # onnxruntime falls back to the CPU silently when the CUDA provider fails to load.
        if session.get_providers()[0] == CUDA:
            return session, CUDA, f"--device {options.device}: the CUDA provider initialised"
        problem = (
            "the CUDA provider failed to initialise (missing CUDA 13 / cuDNN 9 libraries or no GPU)"
        )
    if options.device == "cuda":
        raise DeviceUnavailable(
            f"--device cuda: {problem}; use --device auto or cpu on this machine"
        )
    session = ort.InferenceSession(model_path, settings, providers=[CPU])
    return session, CPU, f"--device auto fell back to the CPU: {problem}"


def cuda_problem() -> str | None:
    """Why CUDA cannot work here, or None when it is worth trying."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    if hasattr(ort, "preload_dlls"):
        try:  # loads CUDA/cuDNN from NVIDIA's pip wheels when those are installed (the `cuda` extra)
            ort.preload_dlls()
        except Exception as err:  # noqa: BLE001 - a failed preload only means the system libraries must serve
            log.debug("onnxruntime.preload_dlls: %s", err)
    return None
