"""Which versions a polling server serves: broken versions refused under load and a fixed one
taken, version policies (latest two, all, specific), and several models each with its own answers.

Every answer is checked against in-process onnxruntime of the file of the version that says it
computed it."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from core.metadata import ModelMetadata
from serving.process import start_server
from tests.support.lifecycle import (
    Load,
    metric_value,
    publish,
    variant_bytes,
    wait_for,
    write_config,
    wrong_answers,
    wrong_signature_bytes,
)
from tests.support.versions import FAILURES, POLL, health, model_file, ready_versions


def publish_broken_versions(repository: Path, original: bytes) -> Path:
    """Versions 2-4 of `mnist`, each broken its own way; returns version 4's half-written folder."""
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
    return half_written


def finish_writing(version_dir: Path, model: bytes) -> None:
    """Its metadata.json, then its model.onnx, each renamed into place (as training writes them)."""
    metadata = ModelMetadata(
        model_name="mnist",
        version=int(version_dir.name),
        model_sha256=hashlib.sha256(model).hexdigest(),
    )
    (version_dir / "metadata.json.tmp").write_text(metadata.to_json())
    (version_dir / "metadata.json.tmp").rename(version_dir / "metadata.json")
    (version_dir / "model.onnx.tmp").write_bytes(model)
    (version_dir / "model.onnx.tmp").rename(version_dir / "model.onnx")


def check_each_refusal_logged_once(log: str) -> None:
    for number, words in (
        (2, "does not match metadata.json"),
        (3, "['pixels'], not ['images']"),
        (4, "still being written"),
    ):
        lines = [
            line for line in log.splitlines() if f"model 'mnist' version {number} refused" in line
        ]
        assert len(lines) == 1 and words in lines[0], lines
        assert "still serving versions [1]" in lines[0]


def test_broken_versions_are_refused_under_load_and_a_fixed_one_is_taken(
    repository, mnist_test_set, version_reference, tmp_path
):
    images, _ = mnist_test_set
    original = model_file(repository, "mnist", 1).read_bytes()
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=12).start()
        try:
            half_written = publish_broken_versions(repository, original)
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
            finish_writing(half_written, variant_bytes(model_file(repository, "mnist", 1), seed=4))
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
    check_each_refusal_logged_once(refused_log)
    assert {a.version for a in load.answers} == {"1", "4"}
    files = {
        ("mnist", "1"): model_file(repository, "mnist", 1),
        ("mnist", "4"): half_written / "model.onnx",
    }
    assert wrong_answers(load.answers, files, images[:1000], version_reference) == []


def check_answers_by_version(client, batch, files, version_reference, versions) -> None:
    """Each version answers `batch` itself: what onnxruntime computes from that version's file."""
    for version in versions:
        result = client.classify(batch, model_version=str(version))
        assert result.model_version == str(version)
        np.testing.assert_allclose(
            result.probabilities, version_reference(files[version], batch), atol=1e-4
        )
    # The versions really differ, so the answers above prove which file computed them.
    assert not np.array_equal(
        version_reference(files[1], batch).argmax(1),
        version_reference(files[2], batch).argmax(1),
    )


def check_a_bad_policy_keeps_the_last_and_a_removed_version_goes(
    server, client, repository: Path, batch
) -> None:
    write_config(repository, "mnist", "{ latest { num_versions: 0 } }")  # a policy that cannot work
    wait_for(
        lambda: metric_value(server.metrics_url, FAILURES, model="mnist", reason="config") == 1,
        30,
        "the refused config.pbtxt",
    )
    assert ready_versions(server.target) == [1, 3]  # the last good policy stays in force

    shutil.rmtree(repository / "mnist" / "3")  # removed from disk: drained, then unloaded
    wait_for(lambda: ready_versions(server.target) == [1], 30, "version 3 unloaded")
    assert client.classify(batch).model_version == "1"


def test_version_policies_latest_two_all_and_specific(
    repository, mnist_test_set, version_reference, tmp_path
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
        check_answers_by_version(client, batch, files, version_reference, versions)

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

            check_a_bad_policy_keeps_the_last_and_a_removed_version_goes(
                server, client, repository, batch
            )
        wait_for(
            lambda: "version 3 unloaded after its accepted calls finished" in server.log(),
            10,
            "the drain",
        )


def test_two_models_each_with_its_own_answers(
    repository, mnist_test_set, version_reference, tmp_path
):
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
        assert wrong_answers(load.answers, files, images[:1000], version_reference) == []
