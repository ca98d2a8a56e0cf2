"""docker-compose.yml, Dockerfile and Dockerfile.gpu, checked without a Docker engine.

1. `docker-compose config` validates the compose file, with and without the gpu profile.
2. Every service's command, environment and healthcheck run here, in compose order, with what the
   compose file says about the containers mapped onto this machine: container paths onto the
   folders its volumes name (named volumes and relative bind mounts into a temporary folder),
   container ports onto free ports, service names onto loopback. A wrong command, path, port or
   variable in the compose file fails here, not on someone's `docker compose up`.
3. The Dockerfiles install through constraints.txt with extras that pyproject.toml defines, keep
   TensorFlow out of the server images, copy what the compose commands use, and run as non-root.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from serving.process import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = {"Dockerfile": ("trainer", "server", "locust"), "Dockerfile.gpu": (None,)}  # None: the last stage
QUICK_TRAIN_ARGS = "--limit 3000 --epochs 1"
BIN_DIR = Path(sys.executable).parent  # the console scripts a container has on its PATH


# --- the compose file as Compose reads it ------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $VAR and $$."""
    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"] or ""
        value = variables.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"{name}: {arg or 'required'}")
        return value or ""
    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node, variables):
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def load_compose(variables: dict[str, str]) -> dict:
    """docker-compose.yml with YAML anchors resolved and the given variables (and no others) interpolated."""
    return _interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), variables)


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def volumes_of(service: dict) -> list[tuple[str, str]]:
    """(source, container path) of each volume; source is a path for bind mounts, else a volume name."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), volume["target"]))
        else:
            source, target = (volume.split(":") + [""])[:2]
            mounts.append((source, target))
    return mounts


def container_ports(compose: dict) -> set[int]:
    ports = set()
    for service in compose["services"].values():
        for spec in service.get("ports") or []:
            ports.add(int(spec["target"]) if isinstance(spec, dict) else int(str(spec).rsplit(":", 1)[-1].split("/")[0]))
        ports.update(int(str(port).split("/")[0]) for port in service.get("expose") or [])
    return ports


def compose_order(compose: dict) -> list[str]:
    """Services in an order that respects depends_on (what `docker compose up` starts first)."""
    services, order = compose["services"], []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join(path + (name,))}"
        if name not in order:
            for dependency in services[name].get("depends_on") or {}:
                visit(dependency, path + (name,))
            order.append(name)
    for name in services:
        visit(name)
    return order


@dataclass
class LocalMapping:
    """Container paths, ports and host names of the compose file, as they are on this machine."""

    scratch: Path
    ports: dict[int, int]
    hosts: set[str]
    paths: dict[str, dict[str, Path]] = field(default_factory=dict)  # service -> container path -> local

    @classmethod
    def of(cls, compose: dict, scratch: Path) -> "LocalMapping":
        mapping = cls(scratch, {port: free_port() for port in sorted(container_ports(compose))},
                      set(compose["services"]) | {"localhost"})
        for name, service in compose["services"].items():
            mapping.paths[name] = {}
            for source, target in volumes_of(service):
                if source.startswith(("/", "~")):  # a bind mount of a host folder: that folder
                    local = Path(source).expanduser()
                    assert local.exists(), f"{name}: bind mount source {source} does not exist"
                else:  # a named volume, or a bind mount relative to the project: a scratch folder
                    local = scratch / ("binds" if source.startswith(".") else "volumes") / source
                    local.mkdir(parents=True, exist_ok=True)
                mapping.paths[name][target] = local.resolve()
        return mapping

    def text(self, service: str, text: str) -> str:
        """Rewrite host:port, container paths and bare container ports in one argument or value."""
        paths = self.paths[service]

        def substitute(match: re.Match) -> str:
            if match["host"]:
                host, port = match["host"], int(match["port"])
                assert host in self.hosts, f"{service}: {match[0]} names no service of the compose file"
                assert port in self.ports, f"{service}: {match[0]}: port {port} is published or exposed by no service"
                return f"127.0.0.1:{self.ports[port]}"
            if match["path"]:
                path = match["path"]
                for target in sorted(paths, key=len, reverse=True):
                    if path == target or path.startswith(target + "/"):
                        return str(paths[target]) + path[len(target):]
                raise AssertionError(f"{service}: {path} (in {text!r}) is on none of the service's volumes "
                                     f"({sorted(paths)}): the container has no such file, or loses what it writes")
            number = int(match["number"])
            return str(self.ports.get(number, number))

        return re.sub(r"(?P<host>\b[A-Za-z][\w.-]*):(?P<port>\d+)\b"
                      r"|(?P<path>(?<![\w./:-])/\w[\w./-]*)"
                      r"|(?<![\w.:/-])(?P<number>\d{2,5})(?![\w.:/])", substitute, text)

    def command(self, service: str, argv: list[str]) -> list[str]:
        local = []
        for index, arg in enumerate(argv):
            if index and argv[index - 1].startswith("--") and argv[index - 1].endswith("host") and arg in self.hosts:
                local.append("127.0.0.1")  # --master-host locust
            else:
                local.append(self.text(service, str(arg)))
        return local

    def environment(self, service: str, compose: dict) -> dict[str, str]:
        """A container's environment: the image's basics plus the service's variables, mapped."""
        base = {key: os.environ[key] for key in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER") if key in os.environ}
        base["PATH"] = os.pathsep.join([str(BIN_DIR), os.environ.get("PATH", "/usr/bin:/bin")])
        base["PYTHONUNBUFFERED"] = "1"
        env = environment_of(compose["services"][service])
        return {**base, **{key: self.text(service, value) for key, value in env.items()}}


def healthcheck_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"healthcheck test must start with CMD or CMD-SHELL, not {kind}"
    return rest if kind == "CMD" else ["sh", "-c", " ".join(rest)]


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        message = "the docker-compose binary is not installed (Debian: apt-get install docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must install it to validate docker-compose.yml")
        pytest.skip(message)
    return exe


# --- 1. docker-compose validates the file ------------------------------------------------------

@pytest.mark.parametrize("mnist_set", [False, True], ids=["MNIST_DATA_DIR-unset", "MNIST_DATA_DIR-set"])
def test_docker_compose_config_is_valid(mnist_set, mnist_path):
    exe = docker_compose()
    env = {key: value for key, value in os.environ.items()
           if key not in ("MNIST_DATA_DIR", "RETRAIN", "TRAIN_ARGS", "LOCUST_TARGET", "COMPOSE_PROFILES")}
    if mnist_set:
        env["MNIST_DATA_DIR"] = str(mnist_path)
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run([exe, *profile, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"docker-compose {' '.join(profile)} config: {result.stderr}"


def test_compose_wiring():
    compose = load_compose({})
    services = compose["services"]
    assert compose_order(compose)[:2] == ["trainer", "server"]
    assert services["server"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert services["server-gpu"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    for name in ("locust", "locust-worker"):
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"
        assert "container_name" not in services[name], "a container_name would stop --scale"
    assert {"8500", "9100"} <= {str(spec).rsplit(":", 1)[-1] for spec in services["server"]["ports"]}
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
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # MNIST: the host's folder (read-only) when MNIST_DATA_DIR is set, else the trainer's download volume.
    for variables, source in (({"MNIST_DATA_DIR": "/srv/mnist"}, "/srv/mnist"), ({}, "mnist")):
        mounts = volumes_of(load_compose(variables)["services"]["trainer"])
        assert (source, "/data/mnist") in mounts


# --- 2. the services, run locally in compose order ---------------------------------------------

def _run(argv, env, timeout):
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_services_run_locally_in_compose_order(tmp_path, mnist_path):
    variables = {"MNIST_DATA_DIR": str(Path(mnist_path).resolve()), "TRAIN_ARGS": QUICK_TRAIN_ARGS}
    compose = load_compose(variables)
    services = compose["services"]
    local = LocalMapping.of(compose, tmp_path)
    order = compose_order(compose)
    assert order.index("trainer") < order.index("server") < order.index("locust") < order.index("locust-worker")
    models = local.paths["server"]["/models"]
    assert models == local.paths["trainer"]["/models"], "trainer and server must share the models volume"

    def versions() -> list[Path]:
        return sorted(models.glob("*/*/model.onnx"))

    # trainer: trains once, then reuses the model; RETRAIN=1 goes back to mnist-train.
    trainer_argv = local.command("trainer", services["trainer"]["command"])
    trainer_env = local.environment("trainer", compose)
    first = _run(trainer_argv, trainer_env, 300)
    assert first.returncode == 0, f"trainer: {trainer_argv}\n{first.stderr[-3000:]}"
    assert len(versions()) == 1, f"the trainer published {versions()} under {models}"
    assert str(Path(mnist_path).resolve()) in first.stderr, "the trainer did not read the mounted MNIST folder"
    second = _run(trainer_argv, trainer_env, 120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing" in second.stderr and len(versions()) == 1, "a second `up` must reuse the model"
    retrain = _run(trainer_argv, {**trainer_env, "RETRAIN": "1", "TRAIN_ARGS": "--help"}, 120)
    assert retrain.returncode == 0 and "usage: mnist-train" in retrain.stdout, retrain.stderr[-2000:]

    # server: the compose command and environment, healthy by the compose healthcheck.
    server_argv = local.command("server", services["server"]["command"])
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as log:
        server = subprocess.Popen(server_argv, cwd=ROOT, env=local.environment("server", compose),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        probe_argv = local.command("server", healthcheck_argv(services["server"]))
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{server_log.read_text()[-3000:]}"
            probe = _run(probe_argv, local.environment("server", compose), 20)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"healthcheck {probe_argv} never passed: {probe.stdout}{probe.stderr}"
            time.sleep(0.5)
        assert len(probe.stdout.strip().splitlines()) == 1 and "SERVING" in probe.stdout, probe.stdout
        assert "CPUExecutionProvider" in server_log.read_text(), "MNIST_SERVE_DEVICE=cpu did not reach the server"

        # locust: the master's compose command made headless, with one worker from locust-worker's.
        locustfile = ROOT / "loadtest" / "locustfile.py"
        locust_error = None
        if locustfile.exists():
            locust_error = _run_locust(local, compose)
        else:
            locust_error = f"{locustfile} does not exist"
    finally:
        stopped = _stop(server)
    assert stopped == 0, f"SIGTERM: the server exited with {stopped}:\n{server_log.read_text()[-3000:]}"
    assert locust_error is None, locust_error


def _run_locust(local: LocalMapping, compose: dict) -> str | None:
    services = compose["services"]
    master_argv = local.command("locust", services["locust"]["command"]) + [
        "--headless", "-u", "2", "-r", "2", "-t", "3s", "--expect-workers", "1", "--expect-workers-max-wait", "30"]
    worker_argv = local.command("locust-worker", services["locust-worker"]["command"])
    worker_log = local.scratch / "locust-worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(worker_argv, cwd=ROOT, env=local.environment("locust-worker", compose),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        master = _run(master_argv, local.environment("locust", compose), 120)
        if master.returncode == 0:
            worker.wait(30)  # the master tells its workers to quit
    finally:
        _stop(worker)
    worker_out = worker_log.read_text(errors="replace")
    if master.returncode != 0:
        return (f"locust master {master_argv} exited {master.returncode}:\n{master.stderr[-3000:]}\n"
                f"worker {worker_argv}:\n{worker_out[-2000:]}")
    if worker.returncode != 0:
        return f"locust worker {worker_argv} exited {worker.returncode}:\n{worker_out[-3000:]}"
    reports = local.paths["locust"]["/reports"]
    if not (reports / "locust_stats.csv").exists() or not (reports / "locust.html").exists():
        return f"no CSV / HTML report in the ./reports mount ({sorted(p.name for p in reports.iterdir())})"
    return None


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


# --- 3. the Dockerfiles ------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages); continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            stages.append(Stage(match[2] or str(len(stages)), match[1], []))
        elif instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def stage_closure(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and every stage it builds on or copies from."""
    by_name = {stage.name: stage for stage in stages}
    seen: list[Stage] = []

    def visit(name: str) -> None:
        stage = by_name[name]
        if stage in seen:
            return
        seen.append(stage)
        if stage.base in by_name:
            visit(stage.base)
        for copy in stage.all("COPY"):
            source = re.search(r"--from=(\S+)", copy)
            if source and source[1] in by_name:
                visit(source[1])
    visit(target)
    return seen


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
    return [run for stage in stages for run in stage.all("RUN") if re.search(r"\bpip\s+install\b", run)]


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_installs_and_users(dockerfile):
    extras = pyproject_extras()
    args, stages = parse_dockerfile(ROOT / dockerfile)
    targets = [target or stages[-1].name for target in DOCKERFILES[dockerfile]]
    assert set(targets) <= {stage.name for stage in stages}, f"{dockerfile}: stages {[s.name for s in stages]}"
    for target in targets:
        closure = stage_closure(stages, target)
        installs = pip_installs(closure)
        assert installs, f"{dockerfile}:{target} installs nothing with pip"
        installed = set()
        for run in installs:
            assert re.search(r"\bpip install -c constraints\.txt\b", run), \
                f"{dockerfile}:{target}: `{run}` does not install through constraints.txt like the Makefile"
            assert "--no-cache-dir" in run, f"{dockerfile}:{target}: `{run}` keeps pip's cache in the image"
            assert not re.search(r"\s-e\s", run), f"{dockerfile}:{target}: an editable install needs the source"
            for group in re.findall(r"""['"]?\.\[([\w,\s-]+)\]['"]?""", run):
                installed |= {extra.strip() for extra in group.split(",")}
        assert installed, f"{dockerfile}:{target}: no `.[extra]` install"
        assert installed <= set(extras), f"{dockerfile}:{target}: extras {installed - set(extras)} not in pyproject"
        pulled = set().union(*(extra_requirements(extra, extras) for extra in installed))
        if "server" in target:
            assert "tensorflow" not in pulled and "tensorflow" not in " ".join(installs), \
                f"{dockerfile}:{target} installs TensorFlow (extras {sorted(installed)})"
        expected = {"trainer": {"training"}, "server": {"serving"}, "locust": {"loadtest"},
                    "server-gpu": {"serving", "cuda"}}[target]
        assert expected <= installed, f"{dockerfile}:{target} installs {sorted(installed)}, not {sorted(expected)}"
        user = effective_user(stages, target)
        assert user.split(":")[0] not in ("root", "0"), f"{dockerfile}:{target} runs as {user}"
        base = external_base(args, stages, target)
        assert base == "python:3.11-slim" or re.fullmatch(r"nvidia/cuda:13\.[\d.]+-cudnn.*-runtime.*", base), base


def test_images_hold_what_the_compose_commands_use():
    """Relative files in a service's command (docker/..., loadtest/...) are copied into its image's WORKDIR."""
    compose = load_compose({})
    for name, service in compose["services"].items():
        build = service["build"]
        args, stages = parse_dockerfile(ROOT / build.get("dockerfile", "Dockerfile"))
        target = build.get("target") or stages[-1].name
        workdirs = [w for stage in reversed(stage_chain(stages, target)) for w in stage.all("WORKDIR")]
        assert workdirs and workdirs[-1] == "/app", f"{name}: WORKDIR {workdirs}"
        copied = []
        for stage in stage_chain(stages, target):
            for copy in stage.all("COPY"):
                if "--from=" in copy:
                    continue
                *sources, dest = [part for part in copy.split() if not part.startswith("--")]
                for source in sources:
                    dest_path = dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") else dest
                    copied.append(os.path.normpath(dest_path.removeprefix("/app/")))
        for arg in service["command"]:
            if not arg.startswith(("/", "-")) and (ROOT / arg).is_file():
                assert any(arg == path or arg.startswith(path + "/") for path in copied), \
                    f"{name}: the command uses {arg}, which image target {target} does not COPY ({copied})"
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
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for required in (".venv", "model_repository", "artifacts", "reports", ".git", "**/__pycache__", ".pytest_cache"):
        assert required in patterns, f".dockerignore misses {required}"


# --- docker/fetch_mnist.py: the download path writes files byte-identical to MNIST's own -------

def test_fetch_mnist_writes_the_published_idx_files(tmp_path, mnist_path):
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import fetch_mnist
    finally:
        sys.path.remove(str(ROOT / "docker"))
    from training.data import load_idx_dir

    data = load_idx_dir(mnist_path)
    fetch_mnist.write_idx_dir(data, tmp_path / "mnist")
    again = load_idx_dir(tmp_path / "mnist")  # checks every file against MNIST's published sha256
    assert (again.test_labels == data.test_labels).all()
    assert not list((tmp_path / "mnist").glob(".*partial"))
