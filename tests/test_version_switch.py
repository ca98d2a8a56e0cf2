"""Versions published while serving, on real server processes and real files: a version trained
under load takes over with no failed call, Locust and mnist-predict follow the version that
answered, memory stays flat over many switches; and the version policy and control flags.

Every answer is checked against in-process onnxruntime of the file of the version that says it
computed it. Callers use all three APIs (mnist.v1 Classify, KServe v2 over gRPC and REST)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from serving.process import start_server
from tests.support.common import predict_args, run_predict, run_train
from tests.support.lifecycle import (
    Load,
    log_instant,
    publish,
    rss_kib,
    variant_bytes,
    wait_for,
    write_config,
    wrong_answers,
)
from tests.support.versions import POLL, model_file


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
    repository, mnist_test_set, version_reference, tmp_path
):
    images, _ = mnist_test_set
    log = tmp_path / "server.log"
    with start_server(repository, *POLL, log_path=log) as server:
        load = Load(server.target, server.http_url, images[:2000], callers=32).start()
        try:
            time.sleep(3)
            trained = run_train(
                *("--out", str(repository), "--artifacts", str(tmp_path / "art")),
                *("--limit", "1200", "--epochs", "1", "--no-int8", "--seed", "7"),
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
    assert wrong_answers(load.answers, files, images[:2000], version_reference) == []
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

    from loadtest.locust_report import read_stats_csv
    from loadtest.locust_runner import run_locust

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
            result = run_predict(
                *predict_args(server.target, mnist_path, 100),
                *("--model-name", "mnist", "--model-version", version, "--quiet"),
            )
            assert result.returncode == 0, result.stderr
            assert "accuracy: " in result.stdout
        missing = run_predict(
            *predict_args(server.target, mnist_path, 10), "--api", "kserve", "--model-version", "7"
        )
        assert (
            missing.returncode == 1
            and "NOT_FOUND" in missing.stderr
            and "ready versions: 1, 2" in missing.stderr
        )
        verbose = run_predict(*predict_args(server.target, mnist_path, 10), "--model-version", "1")
        assert "answered by mnist version 1" in verbose.stdout


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
