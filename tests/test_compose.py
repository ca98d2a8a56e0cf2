"""docker-compose.yml, Dockerfile and Dockerfile.gpu, checked without a Docker engine.

1. `docker-compose config` validates the compose file, with and without the gpu profile, and the
   services are wired as the README says (order, shared volumes, ports, the GPU service).
2. The Dockerfiles install through constraints.txt with extras that pyproject.toml defines, keep
   TensorFlow (and, on the CPU, onnxruntime-gpu) out of the server images, copy what the compose
   commands use, and run as non-root.

tests/test_container_serving.py runs the compose file on a real engine (the images:
tests/test_images.py); the TLS override: tests/test_compose_tls.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.support.compose import (
    COMPOSE_FILE,
    Stage,
    compose_order,
    docker_compose,
    interpolate,
    load_compose,
    parse_dockerfile,
    stage_closure,
    volumes_of,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "Dockerfile": ("trainer", "server", "locust"),
    "Dockerfile.gpu": (None,),
}  # None: the last stage


# --- 1. docker-compose validates the file ------------------------------------------------------


@pytest.mark.parametrize(
    "mnist_set", [False, True], ids=["MNIST_DATA_DIR-unset", "MNIST_DATA_DIR-set"]
)
def test_docker_compose_config_is_valid(mnist_set, mnist_path):
    exe = docker_compose()
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("MNIST_DATA_DIR", "RETRAIN", "TRAIN_ARGS", "LOCUST_TARGET", "COMPOSE_PROFILES")
    }
    if mnist_set:
        env["MNIST_DATA_DIR"] = str(mnist_path)
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [exe, *profile, "-f", str(COMPOSE_FILE), "config", "-q"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"docker-compose {' '.join(profile)} config: {result.stderr}"


def test_compose_wiring():
    compose = load_compose({})
    services = compose["services"]
    assert compose_order(compose)[:2] == ["trainer", "server"]
    assert (
        services["server"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    )
    assert (
        services["server-gpu"]["depends_on"]["trainer"]["condition"]
        == "service_completed_successfully"
    )
    for name in ("locust", "locust-worker"):
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"
        assert "container_name" not in services[name], "a container_name would stop --scale"
    assert {"8500", "9100"} <= {
        str(spec).rsplit(":", 1)[-1] for spec in services["server"]["ports"]
    }
    assert any(str(spec).endswith(":8089") for spec in services["locust"]["ports"])
    # The trainer writes the volume the servers read; servers mount it read-only.
    for name in ("server", "server-gpu"):
        assert ("models", "/models") in volumes_of(services[name])
    assert ("models", "/models") in volumes_of(services["trainer"])
    assert ("./reports", "/reports") in volumes_of(services["locust"])
    # The GPU server: same command as the CPU one plus --device cuda, an NVIDIA GPU reserved.
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert gpu["command"] == services["server"]["command"] + ["--device", "cuda"]
    assert gpu["healthcheck"]["test"] == services["server"]["healthcheck"]["test"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    # MNIST: the host's folder (read-only) when MNIST_DATA_DIR is set, else the trainer's download volume.
    for variables, source in (({"MNIST_DATA_DIR": "/srv/mnist"}, "/srv/mnist"), ({}, "mnist")):
        mounts = volumes_of(load_compose(variables)["services"]["trainer"])
        assert (source, "/data/mnist") in mounts


# --- 2. the Dockerfiles ------------------------------------------------------------------------


def effective_user(stages: list[Stage], target: str) -> str:
    by_name = {stage.name: stage for stage in stages}
    stage = by_name[target]
    while True:
        users = stage.all("USER")
        if users:
            return users[-1]
        if stage.base not in by_name:
            return "root"
        stage = by_name[stage.base]


def external_base(args: dict[str, str], stages: list[Stage], target: str) -> str:
    by_name = {stage.name: stage for stage in stages}
    stage = by_name[target]
    while stage.base in by_name:
        stage = by_name[stage.base]
    return interpolate(stage.base, args)


def pyproject_extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def extra_requirements(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """Requirement names an extra pulls in, through the project's own extras."""
    names = set()
    for requirement in extras[extra]:
        name = re.match(r"[\w.-]+", requirement)[0].lower()
        inner = re.search(r"\[([\w,\s-]+)\]", requirement)
        if name == "mnist-cnn-serving" and inner:
            for sub in inner[1].split(","):
                names |= extra_requirements(sub.strip(), extras)
        else:
            names.add(name)
    return names


def pip_installs(stages: list[Stage]) -> list[str]:
    return [
        run for stage in stages for run in stage.all("RUN") if re.search(r"\bpip\s+install\b", run)
    ]


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_installs_and_users(dockerfile):
    extras = pyproject_extras()
    args, stages = parse_dockerfile(ROOT / dockerfile)
    targets = [target or stages[-1].name for target in DOCKERFILES[dockerfile]]
    assert set(targets) <= {stage.name for stage in stages}, (
        f"{dockerfile}: stages {[s.name for s in stages]}"
    )
    for target in targets:
        closure = stage_closure(stages, target)
        installs = pip_installs(closure)
        assert installs, f"{dockerfile}:{target} installs nothing with pip"
        installed = set()
        for run in installs:
            assert re.search(r"\bpip install -c constraints\.txt\b", run), (
                f"{dockerfile}:{target}: `{run}` does not install through constraints.txt like the Makefile"
            )
            assert "--no-cache-dir" in run, (
                f"{dockerfile}:{target}: `{run}` keeps pip's cache in the image"
            )
            assert not re.search(r"\s-e\s", run), (
                f"{dockerfile}:{target}: an editable install needs the source"
            )
            for group in re.findall(r"""['"]?\.\[([\w,\s-]+)\]['"]?""", run):
                installed |= {extra.strip() for extra in group.split(",")}
        assert installed, f"{dockerfile}:{target}: no `.[extra]` install"
        assert installed <= set(extras), (
            f"{dockerfile}:{target}: extras {installed - set(extras)} not in pyproject"
        )
        pulled = set().union(*(extra_requirements(extra, extras) for extra in installed))
        if "server" in target:
            assert "tensorflow" not in pulled and "tensorflow" not in " ".join(installs), (
                f"{dockerfile}:{target} installs TensorFlow (extras {sorted(installed)})"
            )
        if target in (
            "server",
            "locust",
        ):  # the CPU images: onnxruntime's CPU build, not the CUDA one
            assert "onnxruntime-gpu" not in pulled, (
                f"{dockerfile}:{target} installs onnxruntime-gpu"
            )
        if (
            "server" in target
        ):  # setuptools packages every folder it finds: no training code in a server
            copied = " ".join(copy for stage in closure for copy in stage.all("COPY"))
            assert not re.search(r"\btraining\b", copied), f"{dockerfile}:{target} copies training/"
        expected = {
            "trainer": {"training"},
            "server": {"serving-cpu"},
            "locust": {"loadtest-cpu"},
            "server-gpu": {"serving", "cuda"},
        }[target]
        assert expected <= installed, (
            f"{dockerfile}:{target} installs {sorted(installed)}, not {sorted(expected)}"
        )
        user = effective_user(stages, target)
        assert user.split(":")[0] not in ("root", "0"), f"{dockerfile}:{target} runs as {user}"
        base = external_base(args, stages, target)
        assert base == "python:3.11-slim" or re.fullmatch(
            r"nvidia/cuda:13\.[\d.]+-cudnn.*-runtime.*", base
        ), base


def test_images_hold_what_the_compose_commands_use():
    """Relative files in a service's command (docker/..., loadtest/...) are copied into its image's WORKDIR."""
    compose = load_compose({})
    for name, service in compose["services"].items():
        build = service["build"]
        args, stages = parse_dockerfile(ROOT / build.get("dockerfile", "Dockerfile"))
        target = build.get("target") or stages[-1].name
        workdirs = [
            w for stage in reversed(stage_chain(stages, target)) for w in stage.all("WORKDIR")
        ]
        assert workdirs and workdirs[-1] == "/app", f"{name}: WORKDIR {workdirs}"
        copied = []
        for stage in stage_chain(stages, target):
            for copy in stage.all("COPY"):
                if "--from=" in copy:
                    continue
                *sources, dest = [part for part in copy.split() if not part.startswith("--")]
                for source in sources:
                    dest_path = (
                        dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") else dest
                    )
                    copied.append(os.path.normpath(dest_path.removeprefix("/app/")))
        for arg in service["command"]:
            if not arg.startswith(("/", "-")) and (ROOT / arg).is_file():
                assert any(arg == path or arg.startswith(path + "/") for path in copied), (
                    f"{name}: the command uses {arg}, which image target {target} does not COPY ({copied})"
                )
        if name == "trainer":  # the script runs this one beside itself
            assert "docker/fetch_mnist.py" in copied


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The target and the stages it is FROM (not those it copies from), target first."""
    by_name, chain = {stage.name: stage for stage in stages}, []
    stage = by_name[target]
    while True:
        chain.append(stage)
        if stage.base not in by_name:
            return chain
        stage = by_name[stage.base]


def test_dockerignore_keeps_local_state_out():
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".venv",
        "model_repository",
        "artifacts",
        "reports",
        ".git",
        "**/__pycache__",
        ".pytest_cache",
    ):
        assert required in patterns, f".dockerignore misses {required}"


# --- docker/fetch_mnist.py: the download path writes files byte-identical to MNIST's own -------


def test_fetch_mnist_writes_the_published_idx_files(tmp_path, mnist_path):
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import fetch_mnist
    finally:
        sys.path.remove(str(ROOT / "docker"))
    from core.idx import load_idx_dir

    data = load_idx_dir(mnist_path)
    fetch_mnist.write_idx_dir(data, tmp_path / "mnist")
    again = load_idx_dir(tmp_path / "mnist")  # checks every file against MNIST's published sha256
    assert (again.test_labels == data.test_labels).all()
    assert not list((tmp_path / "mnist").glob(".*partial"))
