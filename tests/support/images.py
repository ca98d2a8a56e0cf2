"""The project's images, each built at most once per session from one clean checkout of HEAD.

Every system test that runs an image (containers, compose stacks, the memory limit, the swarm)
asks the session fixture `images` (tests/conftest.py) for it: a target is built the first time it
is asked for, on the stand-in base image when python:3.11-slim cannot be pulled
(docker/build-standin-base.sh), and tagged `mnist-cnn-serving-<target>:<session tag>`. In CI (a
cold layer cache) each module built the same images itself before: 4-5 minutes of setup apiece.
At the end of the session the tags are removed with `docker rmi --no-prune`, so the layer cache
and the stand-in base image stay and make the next session fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.checkout import clean_checkout
from tests.support.engine import docker, engine_problem, require

CPU_TARGETS = ("server", "locust", "trainer", "envoy")  # stages of the Dockerfile
GPU_TARGET = "server-gpu"  # Dockerfile.gpu
TARGETS = (*CPU_TARGETS, GPU_TARGET)
# The classic builder: BuildKit may reach for a registry.
BUILD_ENV = {"DOCKER_BUILDKIT": "0"}
# Building cold (pip downloads TensorFlow and NVIDIA's CUDA wheels) takes minutes.
BUILD_TIMEOUT_S = 2100


def repository_of(target: str) -> str:
    return f"mnist-cnn-serving-{target}"


def build_argv(target: str, image: str) -> list[str]:
    """The `docker build` of one target, run in the checkout's root."""
    if target == GPU_TARGET:
        return ["docker", "build", "-q", "-f", "Dockerfile.gpu", "-t", image, "."]
    return ["docker", "build", "-q", "--target", target, "-t", image, "."]


@dataclass
class Images:
    """The session's images: built on first use from `checkout`, all tagged `tag`."""

    tag: str
    checkout: Path
    built: list[str] = field(default_factory=list)  # targets built so far, in order
    seconds: dict[str, float] = field(default_factory=dict)  # target -> its build's time
    _base_ready: bool = False

    def image(self, target: str) -> str:
        """The target's image name, built first if this session has not built it yet."""
        if target not in self.built:
            self._build(target)
        return self.name(target)

    def name(self, target: str) -> str:
        return f"{repository_of(target)}:{self.tag}"

    def _build(self, target: str) -> None:
        assert target in TARGETS, f"no image target {target}: {TARGETS}"
        if not self._base_ready:
            base = subprocess.run(
                ["sh", "docker/build-standin-base.sh"],
                cwd=self.checkout,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert base.returncode == 0, f"docker/build-standin-base.sh: {base.stderr[-3000:]}"
            self._base_ready = True
        started = time.monotonic()
        build = subprocess.run(
            build_argv(target, self.name(target)),
            cwd=self.checkout,
            env={**os.environ, **BUILD_ENV},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        what = "-f Dockerfile.gpu" if target == GPU_TARGET else f"--target {target}"
        assert build.returncode == 0, f"docker build {what}:\n{build.stderr[-4000:]}"
        self.seconds[target] = time.monotonic() - started
        self.built.append(target)

    def size_mb(self, image: str) -> float:
        return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6


@contextmanager
def session_images() -> Iterator[Images]:
    """One clean checkout of HEAD and the images built from it; untagged and removed at the end."""
    require(
        engine_problem(),
        "the container tests need a Docker engine (Debian: apt-get install docker.io "
        "docker-compose debootstrap; then start dockerd, as .ci/run does)",
    )
    checkout = Path(tempfile.mkdtemp(prefix="mnist-images-"))
    images = Images(f"mnisttest{uuid.uuid4().hex[:8]}", checkout)
    try:
        clean_checkout(checkout)
        yield images
    finally:
        if images.built:
            tags = [images.name(target) for target in images.built]
            docker("rmi", "--no-prune", *tags, check=False, timeout=300)
        shutil.rmtree(checkout, ignore_errors=True)
        if images.seconds:
            print(
                "\nimage builds: "
                + ", ".join(f"{target} {s:.0f} s" for target, s in images.seconds.items())
            )
