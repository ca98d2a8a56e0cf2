"""One docker compose project on the session's images, and what the compose-stack tests read
from it: containers by service, health, per-replica counters, Locust and mnist-predict runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from serving.process import free_port
from tests.support.engine import compose_command, docker, inspect, logs, require
from tests.support.images import Images
from tests.support.scenario import Scenario, figures_line

BIN_DIR = Path(sys.executable).parent
APP_UID = "1000"  # the images' unprivileged user `app`
# A few seconds of training that still reads digits well (~95 %), as tests/conftest.py uses.
TRAIN_ARGS = "--limit 6000 --epochs 2 --optimizer adam --learning-rate 0.002"
ENTRY_USERS = 32  # Locust users on this machine through the entry point


@dataclass
class Stack(Scenario):
    """One compose project on the session's images, with its host ports and figures."""

    project: str
    images: Images
    compose: list[str]
    env: dict[str, str]
    files: tuple[str, ...] = ("docker-compose.yml",)  # in the checkout, in -f order
    figures: dict[str, str] = field(default_factory=dict)
    seen: dict[str, object] = field(default_factory=dict)  # what each step of the scenario observed
    errors: dict[str, str] = field(default_factory=dict)  # step -> why it could not finish

    @property
    def checkout(self) -> Path:
        return self.images.checkout

    @property
    def grpc_port(self) -> int:
        return int(self.env["GRPC_PORT"])

    def image(self, target: str) -> str:
        return self.images.image(target)

    def run_compose(
        self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        files = [arg for name in self.files for arg in ("-f", str(self.checkout / name))]
        argv = [*self.compose, "-p", self.project, *files, *args]
        result = subprocess.run(
            argv,
            cwd=self.checkout,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"
                f"\ntrainer:\n{self.logs('trainer')[-2000:]}\nserver:\n{self.logs('server')[-2000:]}"
            )
        return result

    def containers(self, service: str) -> list[str]:
        """The service's containers, running or not (by compose's labels, as v1 and v2 set them)."""
        out = docker(
            "ps",
            "-a",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).stdout
        return out.split()

    def container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"service {service}: containers {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return "".join(logs(cid) for cid in self.containers(service))

    def replicas(self) -> list[str]:
        """The running server replicas, in compose's numbering (1, 2, 3...)."""
        running = [inspect(cid) for cid in self.containers("server")]
        running = [c for c in running if c["State"]["Running"]]
        running.sort(
            key=lambda c: int(c["Config"]["Labels"]["com.docker.compose.container-number"])
        )
        return [c["Id"] for c in running]

    def left_after_down(self) -> dict[str, list[str]]:
        """The project's containers, volumes and networks still there (after `down -v`: none)."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": docker("ps", "-a", "-q", "--filter", label).stdout.split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).stdout.split(),
            "networks": docker("network", "ls", "-q", "--filter", label).stdout.split(),
        }


def compose_or_skip() -> list[str]:
    command = compose_command()
    require(
        None if command else "neither `docker compose` nor docker-compose is installed",
        "the container tests need Compose (Debian: apt-get install docker-compose)",
    )
    return command


def reports_dir(checkout: Path) -> Path:
    """./reports as the README has it: Locust writes there as uid 1000."""
    reports = checkout / "reports"
    reports.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(reports, int(APP_UID), int(APP_UID))
    else:
        reports.chmod(0o777)
    return reports


def project_env(images: Images, mnist_path: Path, locust: dict[str, str]) -> dict[str, str]:
    """The host environment for one compose project: the session's images, MNIST, free host
    ports, and the LOCUST_* settings of its Locust service."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "LOCUST_"))
        and key not in ("RETRAIN", "TRAIN_ARGS", "IMAGE_TAG", "CERTS_DIR")
    }
    env.update(
        {
            "IMAGE_TAG": images.tag,
            "MNIST_DATA_DIR": str(Path(mnist_path).resolve()),
            "TRAIN_ARGS": TRAIN_ARGS,
            **{
                name: str(free_port())
                for name in (
                    "GRPC_PORT",
                    "METRICS_PORT",
                    "HTTP_PORT",
                    "LOCUST_PORT",
                    "ENVOY_ADMIN_PORT",
                    "GPU_GRPC_PORT",
                    "GPU_METRICS_PORT",
                )
            },
            **locust,
        }
    )
    return env


@contextmanager
def compose_project(
    images: Images,
    mnist_path: Path,
    project: str,
    locust: dict[str, str],
    targets: tuple[str, ...],
    files: tuple[str, ...] = ("docker-compose.yml",),
) -> Iterator[Stack]:
    """A compose project on the session's images (`targets` built first, for `up --no-build`),
    not yet up; removed at the end whatever happened, and its figures printed."""
    compose = compose_or_skip()
    for target in targets:
        images.image(target)
    reports_dir(images.checkout)
    env = project_env(images, mnist_path, locust)
    stack = Stack(project, images, compose, env, files=files)
    try:
        yield stack
    finally:
        remove_project(stack)
        print(figures_line("container figures", stack.figures))


def remove_project(stack: Stack) -> None:
    for suffix in ("gpu-auto", "gpu-cuda"):  # first: they hold the models volume
        docker("rm", "-f", "-v", f"{stack.project}-{suffix}", check=False)
    stack.run_compose(
        "--profile", "gpu", "down", "-v", "--remove-orphans", "-t", "20", check=False, timeout=300
    )


def wait_healthy(cids: list[str], timeout: float = 120) -> dict[str, str]:
    """Each container's health once it is no longer `starting` (or after the timeout), by name."""
    deadline, health = time.monotonic() + timeout, {}
    for cid in cids:
        while (
            status := inspect(cid)["State"]["Health"]["Status"]
        ) == "starting" and time.monotonic() < deadline:
            time.sleep(2)
        health[inspect(cid)["Name"]] = status
    return health


def requests_counted(cid: str, inference_only: bool = False) -> float:
    """A replica's mnist_requests_total, read from its metrics port inside it: every method and
    code, or (inference_only) the Classify and ModelInfer calls answered OK, leaving out the
    health checks Envoy sends."""
    read = (
        "import urllib.request as u; "
        "print(u.urlopen('http://localhost:9100/metrics', timeout=10).read().decode())"
    )
    text = docker("exec", cid, "python", "-c", read).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mnist_requests_total{")
        and (
            not inference_only
            or ('code="OK"' in line and ("Classify" in line or "ModelInfer" in line))
        )
    )


def aggregated(csv_path: Path) -> dict[str, str]:
    """The `Aggregated` row of a Locust stats CSV."""
    with open(csv_path, newline="") as file:
        return next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")


def mnist_predict(stack: Stack, *args: str) -> tuple[int, str]:
    """mnist-predict on this machine, 500 real MNIST test digits through the published port."""
    result = subprocess.run(
        [
            str(BIN_DIR / "mnist-predict"),
            "--target",
            f"127.0.0.1:{stack.grpc_port}",
            "--mnist-test",
            "500",
            "--data-dir",
            stack.env["MNIST_DATA_DIR"],
            "--quiet",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def host_locust(stack: Stack, name: str, run_time_s: int) -> subprocess.Popen:
    """Locust on this machine, headless, through the published entry point (Envoy)."""
    return subprocess.Popen(
        [
            str(BIN_DIR / "locust"),
            "-f",
            "loadtest/locustfile.py",
            "--headless",
            "-u",
            str(ENTRY_USERS),
            "-r",
            str(ENTRY_USERS),
            "-t",
            f"{run_time_s}s",
            "--host",
            f"127.0.0.1:{stack.grpc_port}",
            "--csv",
            str(stack.checkout / "reports" / name),
            "--only-summary",
            "--loglevel",
            "WARNING",
        ],
        cwd=stack.checkout,
        env={**os.environ, "MNIST_DATA_DIR": stack.env["MNIST_DATA_DIR"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def locust_total(stack: Stack, name: str, locust: subprocess.Popen, timeout: float) -> dict:
    output, _ = locust.communicate(timeout=timeout)
    total = aggregated(stack.checkout / "reports" / f"{name}_stats.csv")
    return {**total, "exit": locust.returncode, "output": output[-3000:]}
