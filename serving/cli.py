"""`mnist-serve`: the gRPC prediction server."""

from __future__ import annotations

import logging
import os
import sys

from serving import event_loop
from serving.config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ValueError as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 2
    from serving import log_setup, tracing

    try:
        # The OTEL_* variables too: a bad one is one line, not a traceback.
        tracing.check_settings(tracing.TraceSettings.of(config))
    except ValueError as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 2
    # Imported after parsing so that --help answers without loading onnxruntime and grpc.
    from core.repository import RepositoryError
    from serving.automatic import resolve_automatic_settings
    from serving.inference.runtime import DeviceUnavailable
    from serving.memory import fit_to_memory_limit
    from serving.server import serve
    from serving.supervisor import run_workers

    try:
        workers_auto = config.workers == 0
        # --workers 0 and --intra-op-threads 0: what fits this machine
        config = resolve_automatic_settings(config)
    except ValueError as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 2
    # Under a container memory limit, default workers and queue sizes that fit it (serving.memory).
    config, memory_line = fit_to_memory_limit(
        config, workers_auto, not _given(argv, "max-queue-size")
    )
    log_setup.configure(config.log_level, config.log_format, lone=config.workers == 1)
    if memory_line:
        logging.getLogger("mnist-serve").info("%s", memory_line)
    try:
        if config.workers > 1:
            return run_workers(config)  # each worker sets its own tracing up, after it was spawned
        tracing.setup(tracing.TraceSettings.of(config), worker=0)
        try:
            return event_loop.run(serve(config))
        finally:
            tracing.shutdown()  # the spans still queued leave before the process does
    except (RepositoryError, DeviceUnavailable, OSError) as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 1


def _given(argv: list[str] | None, flag: str) -> bool:
    """Whether --<flag> is on the command line or MNIST_SERVE_<FLAG> in the environment."""
    args = sys.argv[1:] if argv is None else argv
    return (
        any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in args)
        or f"MNIST_SERVE_{flag.upper().replace('-', '_')}" in os.environ
    )


if __name__ == "__main__":
    sys.exit(main())
