"""The images and docker-compose.yml on a real Docker engine, as the README's "Containers" section uses them.

Runs whenever a Docker engine answers `docker info` (and docker-compose or `docker compose` is there);
outside CI it skips with one line otherwise, under CI=true it fails instead (.ci/run installs and
starts the engine). In one compose project with a unique name, this module:

1. builds every image (three CPU targets and Dockerfile.gpu) from a clean checkout of HEAD
   (`git archive`, so uncommitted edits never enter an image), on a stand-in base image when
   python:3.11-slim cannot be pulled (docker/build-standin-base.sh), and measures their sizes;
2. runs `docker compose up --scale server=3` with a short training: the trainer exits 0, every server
   replica turns healthy by its own healthcheck, Envoy (the one published entry point) turns ready, a
   Locust master with 2 workers runs headless for a bounded time against dns:///server:8500;
3. checks every container runs as uid 1000 and the server image holds no TensorFlow, in the
   running containers; Locust ends with 0 failures and its CSV and HTML report in ./reports, and every
   replica served calls (its own mnist_requests_total); `mnist-predict` and tritonclient on this
   machine get correct answers through the published port (Envoy);
4. Locust on this machine through the entry point: with 3 replicas 0 failures and every replica served
   calls; `docker stop` of one replica under that load (SIGTERM, drain) costs 0 failed calls; scaled
   back to 1 replica, the same load (calls/s with 1 and 3 replicas are figures);
5. `RETRAIN=1` publishes version 2; the GPU image serves on the CPU with one log line saying why
   under `--device auto` and stops with one line under `--device cuda`; `docker compose stop`
   drains the server, which exits 0; `down -v` leaves no container, volume or network.
6. In a second project on the same images, the TLS override (`-f docker-compose.yml -f
   docker-compose.tls.yml`, certificates from docker/make-dev-certs.py): 2 replicas and Envoy turn
   healthy by their mTLS healthchecks, Locust in compose runs with 0 failures, `mnist-predict` over mTLS
   with the token through Envoy's published port reads real MNIST correctly and both replicas answer;
   no client certificate, no token and plaintext are refused; `down -v` leaves nothing.

Everything it creates is removed at the end, even when a test fails: the compose projects, the
containers it runs by hand and the images it tagged (`docker rmi --no-prune`, so the layer cache,
and the stand-in base image, stay and make the next run fast). The scenario runs once, in order, in a
module fixture that records what each step saw; each test checks one promise against that record, so
the tests pass or fail alone in any order. The images are built once (fixture `images`) for both
projects; `-k tls` runs the build and the TLS project alone. Figures (build time, sizes, Locust
calls/s, up times): `pytest -s`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from serving.process import free_port
from tests.support.checkout import clean_checkout

ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent
CI = os.environ.get("CI", "").lower() == "true"
CPU_TARGETS = ("server", "locust", "trainer", "envoy")
IMAGES = {target: f"mnist-cnn-serving-{target}" for target in (*CPU_TARGETS, "server-gpu")}
# What the server image may add over its base (the Dockerfile's PYTHON_IMAGE, python:3.11-slim or
# the stand-in docker/build-standin-base.sh tags as it): the base differs between machines (a
# 123 MB stand-in here, 265 MB elsewhere), what the project adds does not. Measured: 309 MB over
# the 123 MB stand-in (186 MB added), 465 MB over a 265 MB one (200 MB); the CUDA image adds GBs.
BASE_IMAGE = "python:3.11-slim"
SERVER_ADDED_LIMIT_MB = 250
APP_UID = "1000"  # the images' unprivileged user `app`
# A few seconds of training that still reads digits well (~95 %), as tests/conftest.py uses.
TRAIN_ARGS = "--limit 6000 --epochs 2 --optimizer adam --learning-rate 0.002"
LOCUST_WORKERS = 2
LOCUST_RUN_TIME_S = 30
SERVERS = 3  # docker compose up --scale server=3
ENTRY_USERS = 32  # Locust users on this machine through the entry point
ENTRY_RUN_TIME_S = 15
DRAIN_RUN_TIME_S = 20

# Building cold (pip downloads TensorFlow and NVIDIA's CUDA wheels) takes minutes.
pytestmark = pytest.mark.timeout(2400)


# --- the engine ------------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    if _ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _ok(argv: list[str], timeout: float = 30) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _engine_problem() -> str | None:
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
    if _compose_command() is None:
        return "neither `docker compose` nor docker-compose is installed"
    return None


def _docker(
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


def _logs(container: str) -> str:
    """A container's stdout and stderr, interleaved as it wrote them."""
    return subprocess.run(
        ["docker", "logs", container],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    ).stdout


def _inspect(container: str) -> dict:
    return json.loads(_docker("inspect", container).stdout)[0]


# --- the stack -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One compose project, built from a clean checkout, with its host ports and figures."""

    project: str
    tag: str
    checkout: Path
    compose: list[str]
    env: dict[str, str]
    grpc_port: int
    figures: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = (
        "docker-compose.yml",
    )  # the compose files, in the checkout, in -f order
    seen: dict[str, object] = field(default_factory=dict)  # what each step of the scenario observed
    errors: dict[str, str] = field(default_factory=dict)  # step -> why it could not finish

    def step(self, name: str, action) -> None:
        """Run one step of the scenario, recording what it saw; a failure is kept for its test."""
        try:
            action(self)
        except Exception as error:  # noqa: BLE001  (reported by the test that checks this step)
            self.errors[name] = f"{type(error).__name__}: {error}"

    def check(self, *steps: str) -> None:
        failed = {step: self.errors[step] for step in steps if step in self.errors}
        assert not failed, "\n".join(f"{step}: {error}" for step, error in failed.items())

    def image(self, target: str) -> str:
        return f"{IMAGES[target]}:{self.tag}"

    def run_compose(
        self,
        *args: str,
        timeout: float = 600,
        check: bool = True,
        env: dict[str, str] | None = None,
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
        """The service's containers, running or not (by compose's labels, as v1 and v2 both set them)."""
        out = _docker(
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
        return "".join(_logs(cid) for cid in self.containers(service))


@dataclass
class Images:
    """The images built once per module from a clean checkout, shared by the plain and the TLS stack."""

    tag: str
    checkout: Path
    compose: list[str]
    figures: dict[str, str] = field(default_factory=dict)

    def image(self, target: str) -> str:
        return f"{IMAGES[target]}:{self.tag}"


def _build(images: Images) -> None:
    env = {
        **os.environ,
        "DOCKER_BUILDKIT": "0",
    }  # the classic builder: BuildKit may reach for a registry
    base = subprocess.run(
        ["sh", "docker/build-standin-base.sh"],
        cwd=images.checkout,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert base.returncode == 0, f"docker/build-standin-base.sh: {base.stderr[-3000:]}"
    started = time.monotonic()
    for target in CPU_TARGETS:
        build = subprocess.run(
            ["docker", "build", "-q", "--target", target, "-t", images.image(target), "."],
            cwd=images.checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert build.returncode == 0, f"docker build --target {target}:\n{build.stderr[-4000:]}"
    images.figures["build_cpu_s"] = f"{time.monotonic() - started:.0f}"
    started = time.monotonic()
    build = subprocess.run(
        ["docker", "build", "-q", "-f", "Dockerfile.gpu", "-t", images.image("server-gpu"), "."],
        cwd=images.checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, f"docker build -f Dockerfile.gpu:\n{build.stderr[-4000:]}"
    images.figures["build_gpu_s"] = f"{time.monotonic() - started:.0f}"


def _remove_project(stack: Stack) -> None:
    for suffix in ("gpu-auto", "gpu-cuda"):  # first: they hold the models volume
        _docker("rm", "-f", "-v", f"{stack.project}-{suffix}", check=False)
    stack.run_compose(
        "--profile", "gpu", "down", "-v", "--remove-orphans", "-t", "20", check=False, timeout=300
    )


def _project_env(images: Images, mnist_path: Path) -> dict[str, str]:
    """The host environment for one compose project: this module's images, MNIST, and free host ports."""
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
            "GRPC_PORT": str(free_port()),
            "METRICS_PORT": str(free_port()),
            "HTTP_PORT": str(free_port()),
            "LOCUST_PORT": str(free_port()),
            "ENVOY_ADMIN_PORT": str(free_port()),
            "GPU_GRPC_PORT": str(free_port()),
            "GPU_METRICS_PORT": str(free_port()),
        }
    )
    return env


@pytest.fixture(scope="module")
def images(mnist_path):
    """Every image built from HEAD, once for the module; untagged at the end (the layer cache stays)."""
    problem = _engine_problem()
    if problem:
        message = (
            f"{problem}: the container tests need a Docker engine (Debian: apt-get install docker.io "
            f"docker-compose debootstrap; then start dockerd, as .ci/run does)"
        )
        if CI:
            pytest.fail(message + "; under CI=true they must run")
        pytest.skip(message)
    checkout = Path(tempfile.mkdtemp(prefix="mnist-containers-"))
    images = Images(f"mnisttest{uuid.uuid4().hex[:8]}", checkout, _compose_command())
    try:
        clean_checkout(checkout)
        # ./reports as the README has it: Locust writes there as uid 1000.
        reports = checkout / "reports"
        reports.mkdir()
        if os.geteuid() == 0:
            os.chown(reports, int(APP_UID), int(APP_UID))
        else:
            reports.chmod(0o777)
        _build(images)
        for target, image in (
            *((target, images.image(target)) for target in IMAGES),
            ("base", BASE_IMAGE),
        ):
            size = int(_docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
            images.figures[f"size_{target}_mb"] = f"{size / 1e6:.0f}"
        yield images
    finally:
        _docker(
            "rmi",
            "--no-prune",
            *[images.image(target) for target in IMAGES],
            check=False,
            timeout=300,
        )
        shutil.rmtree(checkout, ignore_errors=True)
        print(
            "\ncontainer figures: "
            + ", ".join(f"{key}={value}" for key, value in images.figures.items())
        )


@pytest.fixture(scope="module")
def stack(images, mnist_path):
    env = _project_env(images, mnist_path)
    env.update(
        {
            "LOCUST_HEADLESS": "true",
            "LOCUST_RUN_TIME": f"{LOCUST_RUN_TIME_S}s",
            "LOCUST_USERS": "8",
            "LOCUST_SPAWN_RATE": "8",
            "LOCUST_EXPECT_WORKERS": str(LOCUST_WORKERS),
        }
    )
    # The project is named as the images are tagged (the GPU step names its volume after it).
    stack = Stack(
        images.tag,
        images.tag,
        images.checkout,
        images.compose,
        env,
        int(env["GRPC_PORT"]),
        figures=images.figures,
    )
    try:
        started = time.monotonic()
        # Compose waits for the trainer to succeed and the server to turn healthy before Locust starts.
        stack.run_compose(
            "up",
            "-d",
            "--no-build",
            "--scale",
            f"server={SERVERS}",
            "--scale",
            f"locust-worker={LOCUST_WORKERS}",
            timeout=900,
        )
        stack.figures["up_s"] = f"{time.monotonic() - started:.0f}"
        # The scenario runs once, in this order; the tests below check what it saw, in any order
        # (pytest-randomly shuffles them).
        for name, action in SCENARIO:
            stack.step(name, action)
        yield stack
    finally:
        _remove_project(stack)


# --- the scenario: steps in compose order, each recording what it saw -------------------------------


def _up(stack: Stack) -> None:
    stack.seen["trainer"] = _inspect(stack.container("trainer"))
    stack.seen["trainer_log"] = stack.logs("trainer")
    stack.seen["server_health"] = _wait_healthy(
        [*stack.containers("server"), stack.container("envoy")]
    )
    stack.seen["server_log"] = stack.logs("server")
    stack.seen["envoy_log"] = stack.logs("envoy")


def _users(stack: Stack) -> None:
    # Locust's containers first: they exit when the bounded run ends.
    running = [
        *stack.containers("server"),
        stack.container("envoy"),
        stack.container("locust"),
        *stack.containers("locust-worker"),
    ]
    stack.seen["uids"] = {
        _inspect(cid)["Name"]: _docker("exec", cid, "id", "-u").stdout.strip() for cid in running
    }
    stack.seen["trainer_user"] = _inspect(stack.container("trainer"))["Config"]["User"]
    # The trainer has exited; what it wrote into the models volume is owned by the user it ran as.
    stack.seen["model_owners"] = _docker(
        "exec", stack.containers("server")[0], "sh", "-c", "stat -c %u /models/*/*/model.onnx"
    ).stdout.split()
    probe = (
        "import importlib.metadata as m, importlib.util as u; "
        "print(u.find_spec('tensorflow'), u.find_spec('training'), "
        "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('onnxruntime')))"
    )
    stack.seen["server_packages"] = _docker(
        "exec", stack.containers("server")[0], "python", "-c", probe
    ).stdout.strip()


def _host_clients(stack: Stack) -> None:
    import tritonclient.grpc as grpcclient

    from core.idx import load_idx_dir

    mnist = stack.env["MNIST_DATA_DIR"]
    for api in ("classifier", "kserve"):
        result = subprocess.run(
            [
                str(BIN_DIR / "mnist-predict"),
                "--target",
                f"127.0.0.1:{stack.grpc_port}",
                "--mnist-test",
                "500",
                "--data-dir",
                mnist,
                "--api",
                api,
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        stack.seen[f"predict_{api}"] = (result.returncode, result.stdout + result.stderr)
    data = load_idx_dir(mnist)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}") as client:
        stack.seen["triton_ready"] = client.is_server_ready() and client.is_model_ready("mnist")
        batch = (data.test_images[:64, ..., None] / 255).astype(
            np.float32
        )  # 64: the server's per-call limit
        tensor = grpcclient.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(
            "mnist", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")]
        )
    stack.seen["triton_accuracy"] = float(
        (result.as_numpy("probabilities").argmax(axis=1) == data.test_labels[:64]).mean()
    )


def _locust(stack: Stack) -> None:
    master = stack.container("locust")
    stack.seen["locust_exit"] = _docker(
        "wait", master, timeout=LOCUST_RUN_TIME_S + 240
    ).stdout.strip()
    stack.seen["locust_log"] = stack.logs("locust")
    stack.seen["locust_workers"] = len(stack.containers("locust-worker"))
    reports = stack.checkout / "reports"
    with open(reports / "locust_stats.csv", newline="") as file:
        total = next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")
    stack.seen["locust_total"] = total
    stack.figures["locust_calls_per_s"] = f"{float(total['Requests/s']):.0f}"
    stack.seen["locust_html"] = (reports / "locust.html").read_text()
    # Nothing else has called the replicas yet: what they counted is the Locust run's spread.
    stack.seen["compose_spread"] = _requests_by_replica(stack)


def _requests_total(cid: str) -> float:
    """A replica's mnist_requests_total (all methods and codes), read from its metrics port inside it."""
    read = (
        "import urllib.request as u; "
        "print(u.urlopen('http://localhost:9100/metrics', timeout=10).read().decode())"
    )
    text = _docker("exec", cid, "python", "-c", read).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mnist_requests_total{")
    )


def _replicas(stack: Stack) -> list[str]:
    """The running server replicas, in compose's numbering (1, 2, 3...)."""
    running = [_inspect(cid) for cid in stack.containers("server")]
    running = [c for c in running if c["State"]["Running"]]
    running.sort(key=lambda c: int(c["Config"]["Labels"]["com.docker.compose.container-number"]))
    return [c["Id"] for c in running]


def _requests_by_replica(stack: Stack) -> dict[str, float]:
    return {cid: _requests_total(cid) for cid in _replicas(stack)}


def _host_locust(stack: Stack, name: str, run_time_s: int) -> subprocess.Popen:
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


def _locust_total(stack: Stack, name: str, locust: subprocess.Popen, timeout: float) -> dict:
    output, _ = locust.communicate(timeout=timeout)
    with open(stack.checkout / "reports" / f"{name}_stats.csv", newline="") as file:
        total = next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")
    return {**total, "exit": locust.returncode, "output": output[-3000:]}


def _entry_three(stack: Stack) -> None:
    before = _requests_by_replica(stack)
    total = _locust_total(
        stack, "entry3", _host_locust(stack, "entry3", ENTRY_RUN_TIME_S), ENTRY_RUN_TIME_S + 240
    )
    after = _requests_by_replica(stack)
    stack.seen["entry3"] = total
    stack.seen["entry3_spread"] = {cid: after[cid] - before.get(cid, 0) for cid in after}
    stack.figures["entry_calls_per_s_3_replicas"] = f"{float(total['Requests/s']):.0f}"


def _drain(stack: Stack) -> None:
    """Stop the last replica (SIGTERM, then it drains) while Locust loads the entry point."""
    locust = _host_locust(stack, "drain", DRAIN_RUN_TIME_S)
    try:
        time.sleep(
            DRAIN_RUN_TIME_S / 2
        )  # the run is under way (the pool takes a few seconds to build)
        victim = _replicas(stack)[-1]
        _docker("stop", "-t", "30", victim, timeout=60)
        stack.seen["drained_replica"] = _inspect(victim)["State"]
    finally:
        total = _locust_total(stack, "drain", locust, DRAIN_RUN_TIME_S + 240)
    stack.seen["drain"] = total
    stack.figures["drain_p99_ms"] = total["99%"]


def _entry_one(stack: Stack) -> None:
    # Compose's scale-down removes the highest-numbered replicas (the stopped one among them).
    stack.run_compose(
        "up", "-d", "--no-build", "--no-deps", "--no-recreate", "--scale", "server=1", "server"
    )
    stack.seen["replicas_after_scale_down"] = len(stack.containers("server"))
    time.sleep(5)  # Envoy re-resolves `server` every 2 s
    total = _locust_total(
        stack, "entry1", _host_locust(stack, "entry1", ENTRY_RUN_TIME_S), ENTRY_RUN_TIME_S + 240
    )
    stack.seen["entry1"] = total
    stack.figures["entry_calls_per_s_1_replica"] = f"{float(total['Requests/s']):.0f}"


def _retrain(stack: Stack) -> None:
    stack.run_compose("up", "-d", "--no-build", "trainer", env={"RETRAIN": "1"})
    stack.seen["retrain_exit"] = _docker(
        "wait", stack.container("trainer"), timeout=600
    ).stdout.strip()
    stack.seen["retrain_log"] = stack.logs("trainer")
    stack.seen["versions"] = _docker(
        "exec", stack.container("server"), "ls", "/models/mnist"
    ).stdout.split()


def _gpu_image(stack: Stack) -> None:
    models = f"{stack.project}_models:/models:ro"
    auto = f"{stack.project}-gpu-auto"
    _docker(
        "run", "-d", "--name", auto, "-v", models, stack.image("server-gpu")
    )  # the image's CMD: --device auto
    try:
        deadline = time.monotonic() + 180
        while (
            (health := _inspect(auto)["State"].get("Health", {}).get("Status")) == "starting"
            and _inspect(auto)["State"]["Running"]
            and time.monotonic() < deadline
        ):
            time.sleep(2)
        stack.seen["gpu_auto_health"] = health
        stack.seen["gpu_auto_log"] = _logs(auto)
        stack.seen["gpu_auto_uid"] = _docker("exec", auto, "id", "-u").stdout.strip()
        stack.seen["gpu_auto_tensorflow"] = _docker(
            "exec",
            auto,
            "python",
            "-c",
            "import importlib.util as u; print(u.find_spec('tensorflow'))",
        ).stdout.strip()
    finally:
        _docker("rm", "-f", "-v", auto, check=False)
    cuda = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--name",
            f"{stack.project}-gpu-cuda",
            "-v",
            models,
            stack.image("server-gpu"),
            "mnist-serve",
            "--model-repository",
            "/models",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    stack.seen["gpu_cuda"] = (cuda.returncode, (cuda.stdout + cuda.stderr).strip())


def _stop(stack: Stack) -> None:
    stack.run_compose("stop", "-t", "30")
    stack.seen["server_stopped"] = _inspect(stack.container("server"))["State"]
    stack.seen["server_stop_log"] = stack.logs("server")


def _down(stack: Stack) -> None:
    stack.run_compose("--profile", "gpu", "down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    stack.seen["left_after_down"] = {
        "containers": _docker("ps", "-a", "-q", "--filter", label).stdout.split(),
        "volumes": _docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split(),
    }


SCENARIO = [
    ("up", _up),
    ("users", _users),
    ("locust", _locust),
    ("host_clients", _host_clients),
    ("entry3", _entry_three),
    ("drain", _drain),
    ("entry1", _entry_one),
    ("retrain", _retrain),
    ("gpu_image", _gpu_image),
    ("stop", _stop),
    ("down", _down),
]


# --- the promises -----------------------------------------------------------------------------------


def test_images_are_built_and_the_cpu_server_is_small(images):
    sizes = {target: float(images.figures[f"size_{target}_mb"]) for target in (*IMAGES, "base")}
    added = sizes["server"] - sizes["base"]
    assert 0 < added < SERVER_ADDED_LIMIT_MB, (
        f"the server image adds {added:.0f} MB to its {sizes['base']:.0f} MB base (limit {SERVER_ADDED_LIMIT_MB})"
    )
    assert sizes["server"] < sizes["server-gpu"], sizes


def test_trainer_exits_0_and_server_turns_healthy_by_its_healthcheck(stack):
    stack.check("up")
    trainer, log = stack.seen["trainer"], stack.seen["trainer_log"]
    assert trainer["State"]["Status"] == "exited" and trainer["State"]["ExitCode"] == 0, log[-3000:]
    assert f"training: mnist-train --out /models --artifacts /artifacts {TRAIN_ARGS}" in log, log[
        -3000:
    ]
    health = stack.seen["server_health"]
    assert len(health) == SERVERS + 1 and set(health.values()) == {"healthy"}, (
        f"{health}\nserver:\n{stack.seen['server_log'][-3000:]}\nenvoy:\n{stack.seen['envoy_log'][-2000:]}"
    )


def test_containers_run_as_app_and_the_server_holds_no_tensorflow(stack):
    stack.check("users")
    uids = stack.seen["uids"]
    assert len(uids) == SERVERS + 2 + LOCUST_WORKERS and set(uids.values()) == {APP_UID}, uids
    assert stack.seen["trainer_user"] == "app"
    assert stack.seen["model_owners"] and set(stack.seen["model_owners"]) == {APP_UID}, stack.seen[
        "model_owners"
    ]
    found = stack.seen["server_packages"]
    assert found == "None None ['onnxruntime']", (
        f"server image: tensorflow, training, runtimes = {found}"
    )


def test_host_clients_get_correct_answers_through_the_published_port(stack):
    stack.check("host_clients")
    for api in ("classifier", "kserve"):
        returncode, output = stack.seen[f"predict_{api}"]
        assert returncode == 0, output
        accuracy = float(re.search(r"accuracy: \d+/500 = ([\d.]+)", output)[1])
        assert accuracy >= 0.9, f"mnist-predict --api {api}: {output}"
    assert stack.seen["triton_ready"]
    assert stack.seen["triton_accuracy"] >= 0.9, stack.seen["triton_accuracy"]


def test_locust_master_and_workers_run_headless_with_no_failures_and_reports(stack):
    stack.check("locust")
    assert stack.seen["locust_exit"] == "0", (
        f"the Locust master exited {stack.seen['locust_exit']}:\n{stack.seen['locust_log'][-3000:]}"
    )
    assert stack.seen["locust_workers"] == LOCUST_WORKERS
    total = stack.seen["locust_total"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    html = stack.seen["locust_html"]
    assert "<html" in html.lower() and "Classify" in html, (
        "locust.html is not Locust's report of this run"
    )
    # dns:///server:8500 and round_robin in each user's client: every replica served calls.
    spread = stack.seen["compose_spread"]
    assert len(spread) == SERVERS and all(count > 0 for count in spread.values()), spread


def _no_failures(total: dict) -> None:
    assert (
        total["exit"] == 0 and int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    ), {
        key: value
        for key, value in total.items()
        if key in ("exit", "Request Count", "Failure Count", "output")
    }


def test_the_entry_point_balances_every_call_over_the_replicas(stack):
    stack.check("entry3")
    _no_failures(stack.seen["entry3"])
    spread = stack.seen["entry3_spread"]
    assert len(spread) == SERVERS and all(count > 0 for count in spread.values()), spread


def test_stopping_a_replica_under_load_fails_no_call(stack):
    stack.check("drain")
    state = stack.seen["drained_replica"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state  # drained, not killed
    _no_failures(stack.seen["drain"])


def test_one_replica_behind_the_entry_point_serves_the_same_load(stack):
    stack.check("entry1")
    assert stack.seen["replicas_after_scale_down"] == 1
    _no_failures(stack.seen["entry1"])


def test_retrain_publishes_version_2(stack):
    stack.check("retrain")
    assert stack.seen["retrain_exit"] == "0", stack.seen["retrain_log"][-3000:]
    assert {"1", "2"} <= set(stack.seen["versions"]), stack.seen["versions"]


def test_gpu_image_serves_on_cpu_under_auto_and_stops_under_cuda(stack):
    stack.check("gpu_image")
    log = stack.seen["gpu_auto_log"]
    assert stack.seen["gpu_auto_health"] == "healthy", log[-3000:]
    # Each session it opens says, in one line, that and why it fell back (one reason for all).
    reasons = {
        line.split("fell back to the CPU:", 1)[1].split(";")[0].strip()
        for line in log.splitlines()
        if "fell back to the CPU:" in line
    }
    assert len(reasons) == 1 and "Traceback" not in log, log[-3000:]
    assert stack.seen["gpu_auto_uid"] == APP_UID and stack.seen["gpu_auto_tensorflow"] == "None"
    returncode, output = stack.seen["gpu_cuda"]
    # Its log lines may come first; the error that stops it is one line, the last, with no traceback.
    last = output.splitlines()[-1] if output else ""
    assert (
        returncode != 0
        and last.startswith("mnist-serve: error: --device cuda")
        and "Traceback" not in output
    ), output


def test_stop_drains_the_server_which_exits_0(stack):
    stack.check("stop")
    state = stack.seen["server_stopped"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, stack.seen["server_stop_log"][
        -3000:
    ]


def test_down_v_leaves_nothing(stack):
    stack.check("down")
    assert stack.seen["left_after_down"] == {"containers": [], "volumes": [], "networks": []}, (
        stack.seen["left_after_down"]
    )


# --- the TLS override: docker-compose.yml + docker-compose.tls.yml, mutual TLS and a token everywhere ----------
# One more compose project on the same images: 2 replicas, Envoy and a short Locust run, all over mTLS
# with the token, certificates from docker/make-dev-certs.py in the checkout's ./certs (as the README).

TLS_FILES = ("docker-compose.yml", "docker-compose.tls.yml")
TLS_SERVERS = 2
TLS_LOCUST_RUN_TIME_S = 10


def _wait_healthy(cids: list[str], timeout: float = 120) -> dict[str, str]:
    """Each container's health once it is no longer `starting` (or after the timeout), by name."""
    deadline, health = time.monotonic() + timeout, {}
    for cid in cids:
        while (
            status := _inspect(cid)["State"]["Health"]["Status"]
        ) == "starting" and time.monotonic() < deadline:
            time.sleep(2)
        health[_inspect(cid)["Name"]] = status
    return health


def _inference_answered(cid: str) -> float:
    """A replica's inference calls answered OK (Classify, ModelInfer): health checks through Envoy left out."""
    read = (
        "import urllib.request as u; "
        "print(u.urlopen('http://localhost:9100/metrics', timeout=10).read().decode())"
    )
    text = _docker("exec", cid, "python", "-c", read).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mnist_requests_total{")
        and 'code="OK"' in line
        and ("Classify" in line or "ModelInfer" in line)
    )


def _tls_up(stack: Stack) -> None:
    stack.seen["tls_trainer"] = _inspect(stack.container("trainer"))["State"]
    stack.seen["tls_health"] = _wait_healthy(
        [*stack.containers("server"), stack.container("envoy")]
    )
    stack.seen["tls_server_log"] = stack.logs("server")
    stack.seen["tls_envoy_log"] = stack.logs("envoy")


def _tls_locust(stack: Stack) -> None:
    master = stack.container("locust")
    stack.seen["tls_locust_exit"] = _docker(
        "wait", master, timeout=TLS_LOCUST_RUN_TIME_S + 240
    ).stdout.strip()
    stack.seen["tls_locust_log"] = stack.logs("locust") + stack.logs("locust-worker")
    with open(stack.checkout / "reports" / "locust_stats.csv", newline="") as file:
        stack.seen["tls_locust_total"] = next(
            row for row in csv.DictReader(file) if row["Name"] == "Aggregated"
        )


def _tls_predict(stack: Stack, *args: str) -> tuple[int, str]:
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


def _tls_clients(stack: Stack) -> None:
    certs = stack.checkout / "certs"
    mtls = [
        "--tls-ca",
        str(certs / "ca.crt"),
        "--tls-cert",
        str(certs / "client.crt"),
        "--tls-key",
        str(certs / "client.key"),
    ]
    token = ["--auth-token-file", str(certs / "token")]
    replicas = _replicas(stack)
    before = {cid: _inference_answered(cid) for cid in replicas}
    for api in ("classifier", "kserve"):
        stack.seen[f"tls_predict_{api}"] = _tls_predict(stack, "--api", api, *mtls, *token)
    stack.seen["tls_spread"] = {cid: _inference_answered(cid) - before[cid] for cid in replicas}
    stack.seen["tls_no_client_cert"] = _tls_predict(
        stack, "--tls-ca", str(certs / "ca.crt"), *token
    )
    stack.seen["tls_no_token"] = _tls_predict(stack, *mtls)
    stack.seen["tls_plaintext"] = _tls_predict(stack, *token, "--timeout", "5")


def _tls_down(stack: Stack) -> None:
    stack.run_compose("down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    stack.seen["tls_left_after_down"] = {
        "containers": _docker("ps", "-a", "-q", "--filter", label).stdout.split(),
        "volumes": _docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split(),
    }


TLS_SCENARIO = [
    ("tls_up", _tls_up),
    ("tls_locust", _tls_locust),
    ("tls_clients", _tls_clients),
    ("tls_down", _tls_down),
]


@pytest.fixture(scope="module")
def tls_stack(images, mnist_path):
    env = _project_env(images, mnist_path)
    env.update(
        {
            "LOCUST_HEADLESS": "true",
            "LOCUST_RUN_TIME": f"{TLS_LOCUST_RUN_TIME_S}s",
            "LOCUST_USERS": "4",
            "LOCUST_SPAWN_RATE": "4",
            "LOCUST_EXPECT_WORKERS": "1",
        }
    )
    stack = Stack(
        f"{images.tag}tls",
        images.tag,
        images.checkout,
        images.compose,
        env,
        int(env["GRPC_PORT"]),
        figures=images.figures,
        files=TLS_FILES,
    )
    try:
        made = subprocess.run(
            [sys.executable, "docker/make-dev-certs.py"],
            cwd=images.checkout,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        started = time.monotonic()
        stack.run_compose(
            "up",
            "-d",
            "--no-build",
            "--scale",
            f"server={TLS_SERVERS}",
            "--scale",
            "locust-worker=1",
            timeout=900,
        )
        stack.figures["tls_up_s"] = f"{time.monotonic() - started:.0f}"
        for name, action in TLS_SCENARIO:
            stack.step(name, action)
        yield stack
    finally:
        _remove_project(stack)


def test_tls_replicas_and_envoy_turn_healthy_by_their_mtls_healthchecks(tls_stack):
    tls_stack.check("tls_up")
    assert tls_stack.seen["tls_trainer"]["ExitCode"] == 0, tls_stack.seen["tls_trainer"]
    health = tls_stack.seen["tls_health"]
    seen = tls_stack.seen
    assert len(health) == TLS_SERVERS + 1 and set(health.values()) == {"healthy"}, (
        f"{health}\nserver:\n{seen['tls_server_log'][-3000:]}\nenvoy:\n{seen['tls_envoy_log'][-2000:]}"
    )


def test_tls_locust_in_compose_loads_with_the_client_certificate_and_token(tls_stack):
    tls_stack.check("tls_locust")
    assert tls_stack.seen["tls_locust_exit"] == "0", tls_stack.seen["tls_locust_log"][-3000:]
    total = tls_stack.seen["tls_locust_total"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total


def test_tls_mnist_predict_through_envoy_with_mtls_and_the_token_is_correct_on_every_replica(
    tls_stack,
):
    tls_stack.check("tls_clients")
    for api in ("classifier", "kserve"):
        returncode, output = tls_stack.seen[f"tls_predict_{api}"]
        found = re.search(r"accuracy: \d+/500 = ([\d.]+)", output)
        assert returncode == 0 and found and float(found[1]) >= 0.9, (
            f"mnist-predict --api {api}: {output}"
        )
    spread = tls_stack.seen["tls_spread"]  # Envoy balanced the calls over TLS to both replicas
    assert len(spread) == TLS_SERVERS and all(count > 0 for count in spread.values()), spread


def test_tls_envoy_refuses_calls_without_a_client_certificate_a_token_or_tls(tls_stack):
    tls_stack.check("tls_clients")
    for case, status in (
        ("tls_no_client_cert", "UNAVAILABLE"),
        ("tls_no_token", "UNAUTHENTICATED"),
        ("tls_plaintext", "UNAVAILABLE"),
    ):
        returncode, output = tls_stack.seen[case]
        assert returncode == 1 and f"answered {status}" in output, f"{case}: {output}"


def test_tls_down_v_leaves_nothing(tls_stack):
    tls_stack.check("tls_down")
    assert tls_stack.seen["tls_left_after_down"] == {
        "containers": [],
        "volumes": [],
        "networks": [],
    }, tls_stack.seen["tls_left_after_down"]
