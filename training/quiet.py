"""Silence TensorFlow's import-time chatter so the CLI prints only what matters."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def _stderr_to_devnull():
    # TensorFlow's C++ logger writes to fd 2 before Python can configure it.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="keras")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with _stderr_to_devnull():
        import tensorflow as tf  # noqa: F401
        import tf2onnx  # noqa: F401

        # Device discovery logs (e.g. a failed cuInit on machines without a GPU) happen on first use.
        tf.config.list_physical_devices()
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    from tf2onnx import verbose_logging  # tf2onnx keeps a logger of its own

    verbose_logging.set_level(logging.ERROR)
