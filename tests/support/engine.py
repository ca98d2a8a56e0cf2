"""The Docker engine the system tests drive: whether one answers, the skip/fail rule, and the
`docker` calls every container, compose and swarm test makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

CI = os.environ.get("CI", "").lower() == "true"


def ok(argv: list[str], timeout: float = 30) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_command() -> list[str] | None:
    """`docker compose` (v2) where it answers, else the docker-compose binary, else None."""
    if ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers `docker info`."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` got no answer in 30 s"
    if info.returncode != 0:
        return "no Docker engine answers `docker info`"
    return None


def require(problem: str | None, needs: str) -> None:
    """Outside CI skip with one line; under CI=true fail (.ci/run installs and starts the engines)."""
    if problem is None:
        return
    message = f"{problem}: {needs}"
    if CI:
        pytest.fail(message + "; under CI=true they must run")
    pytest.skip(message)


def docker(
    *args: str, timeout: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def logs(container: str) -> str:
    """A container's stdout and stderr, interleaved as it wrote them."""
    return subprocess.run(
        ["docker", "logs", container],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    ).stdout


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container).stdout)[0]
