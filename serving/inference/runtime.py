"""The onnxruntime session: provider choice (CUDA or CPU), threads, warm-up. Knows nothing of batching."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from core.contract import IMAGE_SHAPE, INPUT_DTYPE, INPUT_NAME, OUTPUT_NAME

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


class OnnxRuntimeSession:
    """Runs the classifier on float32 [N,28,28,1] and returns probabilities [N,10]."""

    def __init__(self, model_path: str, options: RuntimeOptions) -> None:
        self.options = options
        self.session, self.provider, self.reason = _create_session(model_path, options)
        log.info("onnxruntime %s on %s: %s", ort.__version__, self.provider, self.reason)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    def warm_up(self) -> None:
        """Run the sizes a server will meet first so no caller pays for lazy initialisation."""
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


def _create_session(model_path: str, options: RuntimeOptions) -> tuple[ort.InferenceSession, str, str]:
    """Pick the provider: CUDA when asked or when `auto` finds it working, else the CPU."""
    settings = _session_options(options)
    if options.device == "cpu":
        return ort.InferenceSession(model_path, settings, providers=[CPU]), CPU, "--device cpu"
    cuda_problem = _cuda_problem()
    if cuda_problem is None:
        session = ort.InferenceSession(model_path, settings, providers=[CUDA, CPU])
        # onnxruntime falls back to the CPU silently when the CUDA provider fails to load.
        if session.get_providers()[0] == CUDA:
            return session, CUDA, f"--device {options.device}: the CUDA provider initialised"
        cuda_problem = "the CUDA provider failed to initialise (missing CUDA 13 / cuDNN 9 libraries or no GPU)"
    if options.device == "cuda":
        raise DeviceUnavailable(f"--device cuda: {cuda_problem}; use --device auto or cpu on this machine")
    session = ort.InferenceSession(model_path, settings, providers=[CPU])
    return session, CPU, f"--device auto fell back to the CPU: {cuda_problem}"


def _cuda_problem() -> str | None:
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
