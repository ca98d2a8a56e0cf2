"""The images and docker-compose.yml on a real Docker engine, as the README's "Containers" section uses them.

Runs whenever a Docker engine answers `docker info` (and docker-compose or `docker compose` is there);
outside CI it skips with one line otherwise, under CI=true it fails instead (.ci/run installs and
starts the engine). In one compose project with a unique name, this module:

1. builds every image (three CPU targets and Dockerfile.gpu) from a clean checkout of HEAD
   (`git archive`, so uncommitted edits never enter an image), on a stand-in base image when
   python:3.11-slim cannot be pulled (docker/build-standin-base.sh), and measures their sizes;
2. runs `docker compose up` with a short training: the trainer exits 0, the server turns healthy by
   its own healthcheck, a Locust master with 2 workers runs headless for a bounded time;
3. checks every container runs as uid 1000 and the server image holds no TensorFlow, in the
   running containers; `mnist-predict` and tritonclient on this machine get correct answers through
   the published port; Locust ends with 0 failures and its CSV and HTML report in ./reports;
4. `RETRAIN=1` publishes version 2; the GPU image serves on the CPU with one log line saying why
   under `--device auto` and stops with one line under `--device cuda`; `docker compose stop`
   drains the server, which exits 0; `down -v` leaves no container, volume or network.

Everything it creates is removed at the end, even when a test fails: the compose project, the
containers it runs by hand and the images it tagged (`docker rmi --no-prune`, so the layer cache,
and the stand-in base image, stay and make the next run fast). The tests share one compose project
and run in file order. Figures (build time, sizes, Locust calls/s) are printed: `pytest -s`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from serving.process import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent
CI = os.environ.get("CI", "").lower() == "true"
CPU_TARGETS = ("server", "locust", "trainer")
IMAGES = {target: f"mnist-cnn-serving-{target}" for target in (*CPU_TARGETS, "server-gpu")}
SERVER_IMAGE_LIMIT_MB = 350
APP_UID = "1000"  # the images' unprivileged user `app`
# A few seconds of training that still reads digits well (~95 %), as tests/conftest.py uses.
TRAIN_ARGS = "--limit 6000 --epochs 2 --optimizer adam --learning-rate 0.002"
LOCUST_WORKERS = 2
LOCUST_RUN_TIME_S = 30

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
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` got no answer in 30 s"
    if info.returncode != 0:
        return "no Docker engine answers `docker info`"
    if _compose_command() is None:
        return "neither `docker compose` nor docker-compose is installed"
    return None


def _docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def _logs(container: str) -> str:
    """A container's stdout and stderr, interleaved as it wrote them."""
    return subprocess.run(["docker", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60).stdout


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

    def image(self, target: str) -> str:
        return f"{IMAGES[target]}:{self.tag}"

    def run_compose(self, *args: str, timeout: float = 600, check: bool = True,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = [*self.compose, "-p", self.project, "-f", str(self.checkout / "docker-compose.yml"), *args]
        result = subprocess.run(argv, cwd=self.checkout, env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"
                                 f"\ntrainer:\n{self.logs('trainer')[-2000:]}\nserver:\n{self.logs('server')[-2000:]}")
        return result

    def containers(self, service: str) -> list[str]:
        """The service's containers, running or not (by compose's labels, as v1 and v2 both set them)."""
        out = _docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                      "--filter", f"label=com.docker.compose.service={service}").stdout
        return out.split()

    def container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"service {service}: containers {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return "".join(_logs(cid) for cid in self.containers(service))


def _clean_checkout(dest: Path) -> None:
    """HEAD's committed files only: what a fresh clone holds."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True)
    assert archive.returncode == 0, f"git archive HEAD: {archive.stderr.decode()[-500:]} (the tests build HEAD)"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def _build(stack: Stack) -> None:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: BuildKit may reach for a registry
    base = subprocess.run(["sh", "docker/build-standin-base.sh"], cwd=stack.checkout, capture_output=True,
                          text=True, timeout=900)
    assert base.returncode == 0, f"docker/build-standin-base.sh: {base.stderr[-3000:]}"
    started = time.monotonic()
    for target in CPU_TARGETS:
        build = subprocess.run(["docker", "build", "-q", "--target", target, "-t", stack.image(target), "."],
                               cwd=stack.checkout, env=env, capture_output=True, text=True, timeout=1800)
        assert build.returncode == 0, f"docker build --target {target}:\n{build.stderr[-4000:]}"
    stack.figures["build_cpu_s"] = f"{time.monotonic() - started:.0f}"
    started = time.monotonic()
    build = subprocess.run(["docker", "build", "-q", "-f", "Dockerfile.gpu", "-t", stack.image("server-gpu"), "."],
                           cwd=stack.checkout, env=env, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"docker build -f Dockerfile.gpu:\n{build.stderr[-4000:]}"
    stack.figures["build_gpu_s"] = f"{time.monotonic() - started:.0f}"


def _remove_everything(stack: Stack) -> None:
    stack.run_compose("--profile", "gpu", "down", "-v", "--remove-orphans", "-t", "20", check=False, timeout=300)
    for suffix in ("gpu-auto", "gpu-cuda"):
        _docker("rm", "-f", "-v", f"{stack.project}-{suffix}", check=False)
    tagged = [stack.image(target) for target in IMAGES]
    _docker("rmi", "--no-prune", *tagged, check=False, timeout=300)


@pytest.fixture(scope="module")
def stack(mnist_path):
    problem = _engine_problem()
    if problem:
        message = (f"{problem}: the container tests need a Docker engine (Debian: apt-get install docker.io "
                   f"docker-compose debootstrap; then start dockerd, as .ci/run does)")
        if CI:
            pytest.fail(message + "; under CI=true they must run")
        pytest.skip(message)
    checkout = Path(tempfile.mkdtemp(prefix="mnist-containers-"))
    project = f"mnisttest{uuid.uuid4().hex[:8]}"
    grpc_port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COMPOSE_", "LOCUST_")) and key not in ("RETRAIN", "TRAIN_ARGS", "IMAGE_TAG")}
    env.update({
        "IMAGE_TAG": project, "MNIST_DATA_DIR": str(Path(mnist_path).resolve()), "TRAIN_ARGS": TRAIN_ARGS,
        "GRPC_PORT": str(grpc_port), "METRICS_PORT": str(free_port()), "LOCUST_PORT": str(free_port()),
        "GPU_GRPC_PORT": str(free_port()), "GPU_METRICS_PORT": str(free_port()),
        "LOCUST_HEADLESS": "true", "LOCUST_RUN_TIME": f"{LOCUST_RUN_TIME_S}s", "LOCUST_USERS": "8",
        "LOCUST_SPAWN_RATE": "8", "LOCUST_EXPECT_WORKERS": str(LOCUST_WORKERS),
    })
    stack = Stack(project, project, checkout, _compose_command(), env, grpc_port)
    try:
        _clean_checkout(checkout)
        # ./reports as the README has it: Locust writes there as uid 1000.
        reports = checkout / "reports"
        reports.mkdir()
        if os.geteuid() == 0:
            os.chown(reports, int(APP_UID), int(APP_UID))
        else:
            reports.chmod(0o777)
        _build(stack)
        for target in IMAGES:
            size = int(_docker("image", "inspect", "-f", "{{.Size}}", stack.image(target)).stdout)
            stack.figures[f"size_{target}_mb"] = f"{size / 1e6:.0f}"
        started = time.monotonic()
        # Compose waits for the trainer to succeed and the server to turn healthy before Locust starts.
        stack.run_compose("up", "-d", "--no-build", "--scale", f"locust-worker={LOCUST_WORKERS}", timeout=900)
        stack.figures["up_s"] = f"{time.monotonic() - started:.0f}"
        yield stack
    finally:
        _remove_everything(stack)
        shutil.rmtree(checkout, ignore_errors=True)
        print("\ncontainer figures: " + ", ".join(f"{key}={value}" for key, value in stack.figures.items()))


# --- 1-2. images, up, trainer and server ---------------------------------------------------------

def test_images_are_built_and_the_cpu_server_is_small(stack):
    sizes = {target: float(stack.figures[f"size_{target}_mb"]) for target in IMAGES}
    assert sizes["server"] < SERVER_IMAGE_LIMIT_MB, f"server image {sizes['server']:.0f} MB (limit {SERVER_IMAGE_LIMIT_MB})"
    assert sizes["server"] < sizes["server-gpu"], sizes


def test_trainer_exits_0_and_server_turns_healthy(stack):
    trainer = _inspect(stack.container("trainer"))
    assert trainer["State"]["Status"] == "exited" and trainer["State"]["ExitCode"] == 0, stack.logs("trainer")[-3000:]
    assert f"training: mnist-train --out /models --artifacts /artifacts {TRAIN_ARGS}" in stack.logs("trainer")
    deadline = time.monotonic() + 120
    while (health := _inspect(stack.container("server"))["State"]["Health"]["Status"]) != "healthy":
        assert health == "starting" and time.monotonic() < deadline, f"server {health}:\n{stack.logs('server')[-3000:]}"
        time.sleep(2)


def test_containers_run_as_app_and_the_server_holds_no_tensorflow(stack):
    # Locust's containers are checked first: they exit when the bounded run ends.
    running = [stack.container("server"), stack.container("locust"), *stack.containers("locust-worker")]
    assert len(running) == 2 + LOCUST_WORKERS
    for cid in running:
        assert _docker("exec", cid, "id", "-u").stdout.strip() == APP_UID, _inspect(cid)["Name"]
    # The trainer has exited; what it wrote into the models volume is owned by the user it ran as.
    assert _inspect(stack.container("trainer"))["Config"]["User"] == "app"
    owners = _docker("exec", stack.container("server"), "sh", "-c", "stat -c %u /models/mnist/*/model.onnx").stdout
    assert owners.split() == [APP_UID], owners
    probe = ("import importlib.metadata as m, importlib.util as u; "
             "print(u.find_spec('tensorflow'), u.find_spec('training'), "
             "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('onnxruntime')))")
    found = _docker("exec", stack.container("server"), "python", "-c", probe).stdout.strip()
    assert found == "None None ['onnxruntime']", f"server image: tensorflow, training, runtimes = {found}"


# --- 3. clients on this machine through the published port -------------------------------------------

def test_mnist_predict_on_the_host_gets_correct_answers(stack, mnist_path):
    for api in ("classifier", "kserve"):
        result = subprocess.run([str(BIN_DIR / "mnist-predict"), "--target", f"127.0.0.1:{stack.grpc_port}",
                                 "--mnist-test", "500", "--data-dir", str(mnist_path), "--api", api, "--quiet"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        accuracy = float(re.search(r"accuracy: \d+/500 = ([\d.]+)", result.stdout)[1])
        assert accuracy >= 0.9, f"--api {api}: {result.stdout}"


def test_tritonclient_on_the_host_gets_correct_answers(stack, mnist_test_set):
    import tritonclient.grpc as grpcclient

    images, labels = mnist_test_set
    with grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}") as client:
        assert client.is_server_ready() and client.is_model_ready("mnist")
        batch = (images[:64, ..., None] / 255).astype(np.float32)
        tensor = grpcclient.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer("mnist", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    predictions = result.as_numpy("probabilities").argmax(axis=1)
    assert (predictions == labels[:64]).mean() >= 0.9


# --- Locust: master + workers, headless, bounded --------------------------------------------------

def test_locust_master_and_workers_run_headless_with_no_failures(stack):
    master = stack.container("locust")
    waited = _docker("wait", master, timeout=LOCUST_RUN_TIME_S + 240)
    log = stack.logs("locust")
    assert waited.stdout.strip() == "0", f"the Locust master exited {waited.stdout.strip()}:\n{log[-3000:]}"
    assert len(stack.containers("locust-worker")) == LOCUST_WORKERS
    reports = stack.checkout / "reports"
    with open(reports / "locust_stats.csv", newline="") as file:
        total = next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    stack.figures["locust_calls_per_s"] = f"{float(total['Requests/s']):.0f}"
    html = (reports / "locust.html").read_text()
    assert "<html" in html.lower() and "Classify" in html, "locust.html is not Locust's report of this run"


# --- 4. retrain, the GPU image, stop, down -----------------------------------------------------------

def test_retrain_publishes_version_2(stack):
    stack.run_compose("up", "-d", "--no-build", "trainer", env={"RETRAIN": "1"})
    trainer = stack.container("trainer")
    waited = _docker("wait", trainer, timeout=600)
    assert waited.stdout.strip() == "0", stack.logs("trainer")[-3000:]
    versions = _docker("exec", stack.container("server"), "ls", "/models/mnist").stdout.split()
    assert "1" in versions and "2" in versions, versions


def test_gpu_image_falls_back_to_cpu_under_auto_and_stops_under_cuda(stack):
    models = f"{stack.project}_models:/models:ro"
    auto = f"{stack.project}-gpu-auto"
    _docker("run", "-d", "--name", auto, "-v", models, stack.image("server-gpu"))  # the image's CMD: --device auto
    deadline = time.monotonic() + 180
    while (health := _inspect(auto)["State"].get("Health", {}).get("Status")) != "healthy":
        assert _inspect(auto)["State"]["Running"] and time.monotonic() < deadline, \
            f"GPU image under --device auto: {health}\n{_logs(auto)[-3000:]}"
        time.sleep(2)
    log = _logs(auto)
    fallback = [line for line in log.splitlines() if "fell back to the CPU" in line]
    assert len(fallback) == 1, log[-3000:]
    assert _docker("exec", auto, "id", "-u").stdout.strip() == APP_UID
    found = _docker("exec", auto, "python", "-c", "import importlib.util as u; print(u.find_spec('tensorflow'))").stdout
    assert found.strip() == "None"
    _docker("rm", "-f", auto)

    cuda = subprocess.run(["docker", "run", "--rm", "--name", f"{stack.project}-gpu-cuda", "-v", models,
                           stack.image("server-gpu"), "mnist-serve", "--model-repository", "/models", "--device", "cuda"],
                          capture_output=True, text=True, timeout=180)
    output = (cuda.stdout + cuda.stderr).strip()
    assert cuda.returncode != 0 and len(output.splitlines()) == 1 and "--device cuda" in output, output


def test_stop_drains_the_server_which_exits_0(stack):
    stack.run_compose("stop", "-t", "30")
    server = _inspect(stack.container("server"))
    assert server["State"]["Status"] == "exited" and server["State"]["ExitCode"] == 0, stack.logs("server")[-3000:]


def test_down_v_leaves_nothing(stack):
    stack.run_compose("--profile", "gpu", "down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={stack.project}"
    left = {
        "containers": _docker("ps", "-a", "-q", "--filter", label).stdout.split(),
        "volumes": _docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split(),
    }
    assert left == {"containers": [], "volumes": [], "networks": []}, left
