"""What the local swarm runs: the project's images built on the host and pushed to its registry,
a model version pushed as a model image (KServe's "modelcar"), deploy/swarm/stack.yml deployed,
and its replicas counted until every one is healthy."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from swarm_cluster import IMAGE_TARGETS, ROOT, STACK_FILE, Cluster, ClusterError
from swarm_tools import docker, run, say


def build_and_push(cluster: Cluster, build: bool) -> None:
    env = {"DOCKER_BUILDKIT": "0"}  # the classic builder: BuildKit is missing here
    if build:
        say("base image (docker/build-standin-base.sh when python:3.11-slim cannot be pulled)")
        run("sh", str(ROOT / "docker" / "build-standin-base.sh"), timeout=900)
    for target in IMAGE_TARGETS:
        local = f"mnist-cnn-serving-{target}:{cluster.tag}"
        if build:
            say(f"build {local}")
            started = time.monotonic()
            run(
                "docker",
                "build",
                "-q",
                "--target",
                target,
                "-t",
                local,
                str(ROOT),
                env=env,
                timeout=1800,
            )
            say(f"  built in {time.monotonic() - started:.0f} s")
        say(f"push {cluster.image(target)}")
        run("docker", "tag", local, cluster.image(target))
        run("docker", "push", "-q", cluster.image(target), timeout=900)


def newest_version(repository: Path, model: str = "mnist") -> int:
    versions = sorted(int(p.name) for p in (repository / model).glob("*") if p.name.isdigit())
    if not versions:
        raise ClusterError(
            f"no version of {model} under {repository}: train one first "
            f"(make train, or mnist-train --out {repository})"
        )
    return versions[-1]


def build_model_image(
    repository: Path, image: str, version: int | None = None, model: str = "mnist"
) -> str:
    """One model version as an image (KServe's "modelcar" packaging): FROM scratch, holding
    <model>/config.pbtxt and <model>/<version>/{model.onnx, metadata.json}, tagged by the version.
    """
    version = version or newest_version(repository, model)
    source = repository / model / str(version)
    if not (source / "model.onnx").is_file():
        raise ClusterError(f"{source}/model.onnx is missing: publish a complete version")
    tagged = f"{image}:{version}"
    with tempfile.TemporaryDirectory() as context:
        target = Path(context) / model
        shutil.copytree(source, target / str(version))
        if (repository / model / "config.pbtxt").exists():
            shutil.copy(repository / model / "config.pbtxt", target / "config.pbtxt")
        (Path(context) / "Dockerfile").write_text(f"FROM scratch\nCOPY {model} /{model}\n")
        run(
            "docker",
            "build",
            "-q",
            "--label",
            f"org.opencontainers.image.version={version}",
            "-t",
            tagged,
            context,
            env={"DOCKER_BUILDKIT": "0"},
        )
    return tagged


def publish_model(cluster: Cluster, repository: Path, version: int | None = None) -> str:
    """The newest (or given) version of `mnist` in `repository`, pushed as a model image."""
    image = build_model_image(repository, f"{cluster.registry}/mnist-model", version)
    say(f"push model image {image}")
    run("docker", "push", "-q", image, timeout=600)
    return image


def deploy(cluster: Cluster, stack_file: Path = STACK_FILE) -> None:
    say(f"deploy {stack_file.relative_to(ROOT)} as stack {cluster.stack}")
    docker(
        cluster.manager,
        "stack",
        "deploy",
        "--prune",
        "-c",
        str(stack_file),
        cluster.stack,
        env=cluster.stack_env(),
        timeout=300,
    )


def services(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """service name -> (running, wanted) replicas (running counts healthy ones: Swarm starts a
    task with a healthcheck as `starting` and reports it running once healthy)."""
    out = docker(
        cluster.manager, "service", "ls", "--format", "{{.Name}} {{.Replicas}}", check=False
    ).stdout
    replicas = {}
    for line in out.splitlines():
        name, counts = line.split()[:2]
        wanted = int(counts.split("/")[1])
        # Not the REPLICAS column's count of running ones: it lags (it read 3/3 while a drain had
        # left one replica running). The tasks that should run, and run, are counted here.
        states = docker(
            cluster.manager,
            "service",
            "ps",
            name,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.CurrentState}}",
            check=False,
        ).stdout.splitlines()
        running = sum(state.startswith("Running") for state in states)
        replicas[name] = (running if len(states) == wanted else min(running, wanted - 1), wanted)
    return replicas


def wait_healthy(cluster: Cluster, timeout: float = 600) -> None:
    def healthy() -> bool:
        current = services(cluster)
        return bool(current) and all(running == wanted for running, wanted in current.values())

    deadline = time.monotonic() + timeout
    shown = ""
    while not healthy():
        line = ", ".join(f"{name} {r}/{w}" for name, (r, w) in sorted(services(cluster).items()))
        if line != shown:
            say(f"waiting: {line}")
            shown = line
        if time.monotonic() > deadline:
            raise ClusterError(
                f"replicas not healthy after {timeout:.0f} s: {line}; "
                f"`docker -H {cluster.manager.host} service ps {cluster.stack}_server`"
            )
        time.sleep(2)
    line = ", ".join(f"{name} {r}/{w}" for name, (r, w) in sorted(services(cluster).items()))
    say(f"healthy: {line}")


def untag_pushed(cluster: Cluster) -> None:
    """The registry's names of the images this host pushed (the layers stay)."""
    pushed = run(
        "docker", "images", "--format", "{{.Repository}}:{{.Tag}}", check=False
    ).stdout.split()
    pushed = [image for image in pushed if image.startswith(f"{cluster.registry}/")]
    if pushed:
        say(f"untag {len(pushed)} pushed images on this host")
        run("docker", "rmi", "--no-prune", *pushed, check=False, timeout=300)
