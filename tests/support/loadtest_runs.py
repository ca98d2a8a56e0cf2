"""Running the load tests' modules as a user would (`python -m loadtest.run ...`), with the
arguments every short run shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.common import ROOT


def run_module(
    module: str, *args: str, mnist_path: Path, timeout: float
) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_DATA_DIR": str(mnist_path)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def locust_args(
    scenario: str, users: int, run_time: str, pool_size: int, reports_dir: Path, name: str
) -> tuple[str, ...]:
    """loadtest.run's arguments for a short run: `users` spawned at once, reports under `name`."""
    return (
        *("--scenario", scenario, "--users", str(users), "--spawn-rate", str(users)),
        *("--run-time", run_time, "--pool-size", str(pool_size)),
        *("--reports-dir", str(reports_dir), "--name", name),
    )
