"""Model lifecycle on real server processes and real files: versions published while serving,
broken versions refused under load, version policies, several models, memory over many switches.

Every answer is checked against in-process onnxruntime of the file of the version that says it
computed it. Callers use all three APIs (mnist.v1 Classify, KServe v2 over gRPC and REST).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from core.metadata import ModelMetadata
from serving.process import start_server
from tests.support.lifecycle import (
    Load,
    Reference,
    log_instant,
    metric_value,
    publish,
    rss_kib,
    variant_bytes,
    wait_for,
    write_config,
    wrong_answers,
    wrong_signature_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
# One worker: with --workers N each worker polls and switches on its own (see the README).
POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.5", "--workers", "1")
FAILURES = "mnist_model_load_failures_total"


@pytest.fixture()
def repository(trained_repository, tmp_path) -> Path:
    """A copy of the trained `mnist` model alone (version 1), to publish into while serving."""
    copy = tmp_path / "repository"
    copy.mkdir()
    shutil.copytree(trained_repository / "mnist", copy / "mnist")
    return copy


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def model_file(repository: Path, name: str, version: int) -> Path:
    return repository / name / str(version) / "model.onnx"


def ready_versions(target: str, name: str = "mnist") -> list[int]:
    from serving.client import ClassifierClient

    with ClassifierClient(target) as client:
        try:
            return sorted(int(v) for v in client.describe(name).available_versions)
        except grpc.RpcError:
            return []


def health(target: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_version_policy_selects_like_triton() -> None:
    from serving.inference.version_policy import VersionPolicy

    on_disk = [1, 2, 3, 5]
    assert VersionPolicy().select(on_disk) == {5}
    assert VersionPolicy("latest", num_versions=2).select(on_disk) == {3, 5}
    assert VersionPolicy("latest", num_versions=9).select(on_disk) == {1, 2, 3, 5}
    assert VersionPolicy("all").select(on_disk) == {1, 2, 3, 5}
    assert VersionPolicy("specific", versions=(2, 4, 5)).select(on_disk) == {2, 5}
    assert VersionPolicy().select([]) == set()
    with pytest.raises(ValueError, match="at least 1"):
        VersionPolicy("latest", num_versions=0)


def test_model_control_flags_are_checked() -> None:
    from serving.config import load_config

    config = load_config(
        ["--model-name", "mnist", "--model-name", "fashion_mnist", "--model-control-mode", "none"]
    )
    assert config.model_names == ("mnist", "fashion_mnist") and config.model_control_mode == "none"
    assert load_config([]).model_names == () and load_config([]).model_control_mode == "poll"
    assert load_config([], {"MNIST_SERVE_MODEL_NAMES": "a,b"}).model_names == ("a", "b")
    with pytest.raises(ValueError, match="--repository-poll-secs"):
        load_config(["--repository-poll-secs", "0"])
    with pytest.raises(ValueError, match="--model-name"):
        load_config(["--model-name", "../elsewhere"])


def test_a_version_published_by_training_under_load_takes_over_with_no_failed_call(
    repository, mnist_test_set, reference, tmp_path
):
    images, _ = mnist_test_set
    log = tmp_path / "server.log"
    with start_server(repository, *POLL, log_path=log) as server:
        load = Load(server.target, server.http_url, images[:2000], callers=32).start()
        try:
            time.sleep(3)
            trained = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "training.cli",
                    "--out",
                    str(repository),
                    "--artifacts",
                    str(tmp_path / "art"),
                    "--limit",
                    "1200",
                    "--epochs",
                    "1",
                    "--no-int8",
                    "--seed",
                    "7",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=ROOT,
            )
            assert trained.returncode == 0, trained.stderr[-2000:]
            published = (
                (repository / "mnist" / "2").stat().st_ctime
            )  # renamed into place by write_version
            wait_for(
                lambda: any(a.version == "2" for a in load.answers), 60, "an answer from version 2"
            )
            time.sleep(3)  # keep calling on the new version, and past the old one's drain
        finally:
            load.stop()
        server_log = server.log()
    assert not load.failures, load.failures[:5]
    versions = {a.version for a in load.answers}
    assert versions == {"1", "2"}, versions
    assert {a.api for a in load.answers if a.version == "2"} == {
        "classify",
        "kserve_grpc",
        "kserve_rest",
    }
    files = {
        ("mnist", "1"): model_file(repository, "mnist", 1),
        ("mnist", "2"): model_file(repository, "mnist", 2),
    }
    assert wrong_answers(load.answers, files, images[:2000], reference) == []
    # Every call sent after the switch was answered by the new version; none by the old one.
    switched = log_instant(server_log, r"now serves versions \[2\]")
    late = [a for a in load.answers if a.started > switched + 0.002]
    assert late and all(a.version == "2" for a in late)
    assert "version 1 unloaded after its accepted calls finished" in server_log
    print(
        f"\nswitch: version 2 renamed into place -> serving in {switched - published:.2f} s "
        f"(poll 0.5 s + checks and warm-up); {len(load.answers)} calls, 0 failed"
    )


def test_locust_judges_each_answer_by_the_version_that_computed_it(
    repository, mnist_path, tmp_path
):
    import threading

    from loadtest.locust_runner import read_stats_csv, run_locust

    # A version whose honest answers differ from version 1's on some digits: judged against version
    # 1's answers, those would be "wrong predictions".
    new_version = variant_bytes(model_file(repository, "mnist", 1), seed=3)

    def publish_soon() -> None:
        time.sleep(2)
        publish(repository, "mnist", 2, new_version)

    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        run_locust(
            server.target,
            scenario="mix",
            users=6,
            spawn_rate=6,
            run_time="10s",
            csv_prefix=tmp_path / "switch",
            log_path=tmp_path / "locust.log",
            mix_weights="1,1,1,1",
            extra=["--pool-size", "500", "--http-host", f"127.0.0.1:{server.http_port}"],
            on_spawned=lambda: threading.Thread(target=publish_soon, daemon=True).start(),
        )
        assert "now serves versions [2]" in server.log()
    stats = read_stats_csv(tmp_path / "switch_stats.csv")
    locust_log = (tmp_path / "locust.log").read_text()
    assert stats["Aggregated"].requests > 0 and stats["Aggregated"].failures == 0, locust_log[
        -3000:
    ]
    assert "screened mnist version 2" in locust_log


def test_mnist_predict_names_a_model_and_version(repository, mnist_path, tmp_path):
    publish(repository, "mnist", 2, variant_bytes(model_file(repository, "mnist", 1), seed=5))
    write_config(repository, "mnist", "{ all { } }")
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        for version in ("1", "2"):
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "serving.predict_cli",
                    "--target",
                    server.target,
                    "--mnist-test",
                    "100",
                    "--data-dir",
                    str(mnist_path),
                    "--model-name",
                    "mnist",
                    "--model-version",
                    version,
                    "--quiet",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            assert result.returncode == 0, result.stderr
            assert "accuracy: " in result.stdout
        missing = subprocess.run(
            [
                sys.executable,
                "-m",
                "serving.predict_cli",
                "--target",
                server.target,
                "--mnist-test",
                "10",
                "--data-dir",
                str(mnist_path),
                "--api",
                "kserve",
                "--model-version",
                "7",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert (
            missing.returncode == 1
            and "NOT_FOUND" in missing.stderr
            and "ready versions: 1, 2" in missing.stderr
        )
        verbose = subprocess.run(
            [
                sys.executable,
                "-m",
                "serving.predict_cli",
                "--target",
                server.target,
                "--mnist-test",
                "10",
                "--data-dir",
                str(mnist_path),
                "--model-version",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert "answered by mnist version 1" in verbose.stdout


def test_broken_versions_are_refused_under_load_and_a_fixed_one_is_taken(
    repository, mnist_test_set, reference, tmp_path
):
    images, _ = mnist_test_set
    original = model_file(repository, "mnist", 1).read_bytes()
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=12).start()
        try:
            # 2: the file changed after metadata.json recorded its checksum (a truncated copy).
            publish(
                repository,
                "mnist",
                2,
                original[: len(original) // 2],
                sha256=hashlib.sha256(original).hexdigest(),
            )
            # 3: a valid ONNX model with another input and shape.
            publish(repository, "mnist", 3, wrong_signature_bytes())
            # 4: a folder still being written: half of model.onnx, no metadata.json yet.
            half_written = repository / "mnist" / "4"
            half_written.mkdir()
            (half_written / "model.onnx").write_bytes(original[:1000])
            for reason in ("checksum", "signature", "incomplete"):
                wait_for(
                    lambda r=reason: (
                        metric_value(server.metrics_url, FAILURES, model="mnist", reason=r) >= 1
                    ),
                    30,
                    f"a '{reason}' load failure",
                )
            time.sleep(
                2
            )  # several more polls: each refusal is logged and counted once, not per poll
            assert ready_versions(server.target) == [1]
            assert health(server.target) == "SERVING"
            refused_log = server.log()
            counted = {
                r: metric_value(server.metrics_url, FAILURES, model="mnist", reason=r)
                for r in ("checksum", "signature", "incomplete")
            }
            # Version 4 finished (its metadata.json, then its model.onnx, each renamed into place):
            # a later poll checks it again and it takes over.
            fixed = variant_bytes(model_file(repository, "mnist", 1), seed=4)
            metadata = ModelMetadata(
                model_name="mnist", version=4, model_sha256=hashlib.sha256(fixed).hexdigest()
            )
            (half_written / "metadata.json.tmp").write_text(metadata.to_json())
            (half_written / "metadata.json.tmp").rename(half_written / "metadata.json")
            (half_written / "model.onnx.tmp").write_bytes(fixed)
            (half_written / "model.onnx.tmp").rename(half_written / "model.onnx")
            wait_for(lambda: ready_versions(server.target) == [4], 30, "the fixed version 4")
            wait_for(
                lambda: any(a.version == "4" for a in load.answers), 30, "an answer from version 4"
            )
        finally:
            load.stop()
    assert not load.failures, load.failures[:5]
    assert counted == {"checksum": 1, "signature": 1, "incomplete": 1}, (
        counted
    )  # once each, not once per poll
    for number, words in (
        (2, "does not match metadata.json"),
        (3, "['pixels'], not ['images']"),
        (4, "still being written"),
    ):
        lines = [
            line
            for line in refused_log.splitlines()
            if f"model 'mnist' version {number} refused" in line
        ]
        assert len(lines) == 1 and words in lines[0], lines
        assert "still serving versions [1]" in lines[0]
    assert {a.version for a in load.answers} == {"1", "4"}
    files = {
        ("mnist", "1"): model_file(repository, "mnist", 1),
        ("mnist", "4"): half_written / "model.onnx",
    }
    assert wrong_answers(load.answers, files, images[:1000], reference) == []


def test_version_policies_latest_two_all_and_specific(
    repository, mnist_test_set, reference, tmp_path
):
    from serving.client import ClassifierClient

    images, _ = mnist_test_set
    source = model_file(repository, "mnist", 1)
    for version in (2, 3):
        publish(repository, "mnist", version, variant_bytes(source, seed=version))
    write_config(repository, "mnist", "{ latest { num_versions: 2 } }")
    files = {v: model_file(repository, "mnist", v) for v in (1, 2, 3)}
    batch = images[:64]

    def answers_by_version(client: ClassifierClient, versions: list[int]) -> None:
        for version in versions:
            result = client.classify(batch, model_version=str(version))
            assert result.model_version == str(version)
            np.testing.assert_allclose(
                result.probabilities, reference(files[version], batch), atol=1e-4
            )
        # The versions really differ, so the answers above prove which file computed them.
        assert not np.array_equal(
            reference(files[1], batch).argmax(1), reference(files[2], batch).argmax(1)
        )

    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        with ClassifierClient(server.target) as client:
            assert ready_versions(server.target) == [2, 3]
            answers_by_version(client, [2, 3])
            assert (
                client.classify(batch).model_version == "3"
            )  # empty version: the newest ready one
            with pytest.raises(grpc.RpcError) as refused:
                client.classify(batch, model_version="1")
            assert (
                refused.value.code() == grpc.StatusCode.NOT_FOUND
                and "ready versions: 2, 3" in refused.value.details()
            )

            write_config(repository, "mnist", "{ all { } }")
            wait_for(lambda: ready_versions(server.target) == [1, 2, 3], 30, "policy all")
            answers_by_version(client, [1, 2, 3])

            write_config(repository, "mnist", "{ specific { versions: [1, 3] } }")
            wait_for(lambda: ready_versions(server.target) == [1, 3], 30, "policy specific [1, 3]")
            answers_by_version(client, [1, 3])
            assert client.classify(batch).model_version == "3"

            write_config(
                repository, "mnist", "{ latest { num_versions: 0 } }"
            )  # a policy that cannot work
            wait_for(
                lambda: (
                    metric_value(server.metrics_url, FAILURES, model="mnist", reason="config") == 1
                ),
                30,
                "the refused config.pbtxt",
            )
            assert ready_versions(server.target) == [1, 3]  # the last good policy stays in force

            shutil.rmtree(repository / "mnist" / "3")  # removed from disk: drained, then unloaded
            wait_for(lambda: ready_versions(server.target) == [1], 30, "version 3 unloaded")
            assert client.classify(batch).model_version == "1"
        wait_for(
            lambda: "version 3 unloaded after its accepted calls finished" in server.log(),
            10,
            "the drain",
        )


def test_two_models_each_with_its_own_answers(repository, mnist_test_set, reference, tmp_path):
    import tritonclient.grpc as triton

    images, _ = mnist_test_set
    source = model_file(repository, "mnist", 1)
    write_config(repository, "digits_b")
    publish(repository, "digits_b", 1, variant_bytes(source, seed=11))
    files = {("mnist", "1"): source, ("digits_b", "1"): model_file(repository, "digits_b", 1)}
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        loads = [
            Load(server.target, server.http_url, images[:1000], model=name, callers=6).start()
            for name in ("mnist", "digits_b")
        ]
        time.sleep(4)
        for load in loads:
            load.stop()
        client = triton.InferenceServerClient(server.target)
        assert client.is_model_ready("mnist") and client.is_model_ready("digits_b", "1")
        assert not client.is_model_ready("digits_b", "2")
    for load in loads:
        assert not load.failures and load.answers, load.failures[:5]
        assert {a.model for a in load.answers} == {load.model}
        assert wrong_answers(load.answers, files, images[:1000], reference) == []


def test_memory_stays_flat_over_twenty_version_switches(repository, tmp_path):
    from serving.client import ClassifierClient

    source = model_file(repository, "mnist", 1)
    variants = [variant_bytes(source, seed=s) for s in (1, 2)]
    rss = []
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        with ClassifierClient(server.target) as client:
            probe = np.zeros((8, 28, 28), np.uint8)
            for switch in range(1, 21):
                version = switch + 1
                publish(repository, "mnist", version, variants[switch % 2])
                wait_for(
                    lambda v=version: client.classify(probe).model_version == str(v),
                    30,
                    f"version {version}",
                )
                # The previous version drains and is unloaded one retire delay later.
                wait_for(
                    lambda v=version: f"version {v - 1} unloaded" in server.log(),
                    30,
                    f"version {version - 1} gone",
                )
                shutil.rmtree(repository / "mnist" / str(version - 1))
                rss.append(rss_kib(server.proc.pid))
    print(
        f"\nRSS after switch 1: {rss[0] / 1024:.1f} MiB, after switch 20: {rss[-1] / 1024:.1f} MiB "
        f"({100 * (rss[-1] / rss[0] - 1):+.1f} %)"
    )
    assert rss[-1] <= rss[0] * 1.10, [r // 1024 for r in rss]  # MiB after each switch
