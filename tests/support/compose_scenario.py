"""The steps tests/test_container_serving.py runs, in order, on one compose project: each
records what it saw in `stack.seen` (and figures in `stack.figures`) for the tests to check."""

from __future__ import annotations

import subprocess
import time

import numpy as np

from tests.support.engine import docker, inspect, logs
from tests.support.stack import (
    Stack,
    aggregated,
    host_locust,
    locust_total,
    mnist_predict,
    requests_counted,
    wait_healthy,
)

LOCUST_WORKERS = 2
LOCUST_RUN_TIME_S = 30
SERVERS = 3  # docker compose up --scale server=3
ENTRY_RUN_TIME_S = 15
DRAIN_RUN_TIME_S = 20
PACKAGES_PROBE = (
    "import importlib.metadata as m, importlib.util as u; "
    "print(u.find_spec('tensorflow'), u.find_spec('training'), "
    "sorted(d.metadata['Name'] for d in m.distributions() "
    "if d.metadata['Name'].startswith('onnxruntime')))"
)


def _up(stack: Stack) -> None:
    stack.seen["trainer"] = inspect(stack.container("trainer"))
    stack.seen["trainer_log"] = stack.logs("trainer")
    stack.seen["server_health"] = wait_healthy(
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
        inspect(cid)["Name"]: docker("exec", cid, "id", "-u").stdout.strip() for cid in running
    }
    stack.seen["trainer_user"] = inspect(stack.container("trainer"))["Config"]["User"]
    # The trainer has exited; what it wrote into the models volume is owned by the user it ran as.
    server = stack.containers("server")[0]
    stack.seen["model_owners"] = docker(
        "exec", server, "sh", "-c", "stat -c %u /models/*/*/model.onnx"
    ).stdout.split()
    stack.seen["server_packages"] = docker(
        "exec", server, "python", "-c", PACKAGES_PROBE
    ).stdout.strip()


def _host_clients(stack: Stack) -> None:
    import tritonclient.grpc as grpcclient

    from core.idx import load_idx_dir

    for api in ("classifier", "kserve"):
        stack.seen[f"predict_{api}"] = mnist_predict(stack, "--api", api)
    data = load_idx_dir(stack.env["MNIST_DATA_DIR"])
    with grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}") as client:
        stack.seen["triton_ready"] = client.is_server_ready() and client.is_model_ready("mnist")
        # 64: the server's per-call limit
        batch = (data.test_images[:64, ..., None] / 255).astype(np.float32)
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
    stack.seen["locust_exit"] = docker(
        "wait", master, timeout=LOCUST_RUN_TIME_S + 240
    ).stdout.strip()
    stack.seen["locust_log"] = stack.logs("locust")
    stack.seen["locust_workers"] = len(stack.containers("locust-worker"))
    reports = stack.checkout / "reports"
    total = aggregated(reports / "locust_stats.csv")
    stack.seen["locust_total"] = total
    stack.figures["locust_calls_per_s"] = f"{float(total['Requests/s']):.0f}"
    stack.seen["locust_html"] = (reports / "locust.html").read_text()
    # Nothing else has called the replicas yet: what they counted is the Locust run's spread.
    stack.seen["compose_spread"] = _requests_by_replica(stack)


def _requests_by_replica(stack: Stack) -> dict[str, float]:
    return {cid: requests_counted(cid) for cid in stack.replicas()}


def _entry_load(stack: Stack, name: str) -> dict:
    """ENTRY_RUN_TIME_S of Locust on this machine through the entry point; its Aggregated row."""
    locust = host_locust(stack, name, ENTRY_RUN_TIME_S)
    return locust_total(stack, name, locust, ENTRY_RUN_TIME_S + 240)


def _entry_three(stack: Stack) -> None:
    before = _requests_by_replica(stack)
    total = _entry_load(stack, "entry3")
    after = _requests_by_replica(stack)
    stack.seen["entry3"] = total
    stack.seen["entry3_spread"] = {cid: after[cid] - before.get(cid, 0) for cid in after}
    stack.figures["entry_calls_per_s_3_replicas"] = f"{float(total['Requests/s']):.0f}"


def _drain(stack: Stack) -> None:
    """Stop the last replica (SIGTERM, then it drains) while Locust loads the entry point."""
    locust = host_locust(stack, "drain", DRAIN_RUN_TIME_S)
    try:
        # The run is under way (the pool takes a few seconds to build).
        time.sleep(DRAIN_RUN_TIME_S / 2)
        victim = stack.replicas()[-1]
        docker("stop", "-t", "30", victim, timeout=60)
        stack.seen["drained_replica"] = inspect(victim)["State"]
    finally:
        total = locust_total(stack, "drain", locust, DRAIN_RUN_TIME_S + 240)
    stack.seen["drain"] = total
    stack.figures["drain_p99_ms"] = total["99%"]


def _entry_one(stack: Stack) -> None:
    # Compose's scale-down removes the highest-numbered replicas (the stopped one among them).
    stack.run_compose(
        "up", "-d", "--no-build", "--no-deps", "--no-recreate", "--scale", "server=1", "server"
    )
    stack.seen["replicas_after_scale_down"] = len(stack.containers("server"))
    time.sleep(5)  # Envoy re-resolves `server` every 2 s
    total = _entry_load(stack, "entry1")
    stack.seen["entry1"] = total
    stack.figures["entry_calls_per_s_1_replica"] = f"{float(total['Requests/s']):.0f}"


def _retrain(stack: Stack) -> None:
    stack.run_compose("up", "-d", "--no-build", "trainer", env={"RETRAIN": "1"})
    stack.seen["retrain_exit"] = docker(
        "wait", stack.container("trainer"), timeout=600
    ).stdout.strip()
    stack.seen["retrain_log"] = stack.logs("trainer")
    stack.seen["versions"] = docker(
        "exec", stack.container("server"), "ls", "/models/mnist"
    ).stdout.split()


def _gpu_auto(stack: Stack, models: str) -> None:
    """The GPU image with its CMD (--device auto) on this CPU-only engine, until healthy."""
    auto = f"{stack.project}-gpu-auto"
    docker("run", "-d", "--name", auto, "-v", models, stack.image("server-gpu"))
    try:
        deadline = time.monotonic() + 180
        while (
            (health := inspect(auto)["State"].get("Health", {}).get("Status")) == "starting"
            and inspect(auto)["State"]["Running"]
            and time.monotonic() < deadline
        ):
            time.sleep(2)
        stack.seen["gpu_auto_health"] = health
        stack.seen["gpu_auto_log"] = logs(auto)
        stack.seen["gpu_auto_uid"] = docker("exec", auto, "id", "-u").stdout.strip()
        find_tensorflow = "import importlib.util as u; print(u.find_spec('tensorflow'))"
        stack.seen["gpu_auto_tensorflow"] = docker(
            "exec", auto, "python", "-c", find_tensorflow
        ).stdout.strip()
    finally:
        docker("rm", "-f", "-v", auto, check=False)


def _gpu_image(stack: Stack) -> None:
    models = f"{stack.project}_models:/models:ro"
    _gpu_auto(stack, models)
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
    stack.seen["server_stopped"] = inspect(stack.container("server"))["State"]
    stack.seen["server_stop_log"] = stack.logs("server")


def _down(stack: Stack) -> None:
    stack.run_compose("--profile", "gpu", "down", "-v", "--remove-orphans")
    stack.seen["left_after_down"] = stack.left_after_down()


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
