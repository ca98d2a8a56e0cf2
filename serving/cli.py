"""`mnist-serve`: the gRPC prediction server."""
from __future__ import annotations

import logging
import sys

from serving import event_loop
from serving.config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ValueError as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after parsing so that --help answers without loading onnxruntime and grpc.
    from core.repository import RepositoryError
    from serving.inference.runtime import DeviceUnavailable
    from serving.server import serve
    from serving.workers import resolve, run_workers

    try:
        config = resolve(config)  # --workers 0 and --intra-op-threads 0: what fits this machine
    except ValueError as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 2
    try:
        if config.workers > 1:
            return run_workers(config)
        return event_loop.run(serve(config))
    except (RepositoryError, DeviceUnavailable, OSError) as err:
        print(f"mnist-serve: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
