"""The model repository changing under a running server in bad ways, and a disk that fills up
while training publishes.

Each case runs on a real server process (poll mode) under concurrent callers of all three APIs:
the loaded version keeps serving with no failed call, the change is refused with one log line
and one count in mnist_model_load_failures_total, and the server recovers once a valid version
appears. Answers are checked against in-process onnxruntime of the file that computed them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.metadata import ModelMetadata
from core.repository import RepositoryError, list_versions, write_version
from serving.process import start_server
from tests.support.common import ROOT
from tests.support.lifecycle import (
    Load,
    metric_value,
    publish,
    variant_bytes,
    wait_for,
    wrong_answers,
)
from tests.support.versions import FAILURES

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.3", "--workers", "1")


def failures(server, reason: str) -> float:
    return metric_value(server.metrics_url, FAILURES, model="mnist", reason=reason)


def log_lines(server, words: str) -> list[str]:
    return [line for line in server.log().splitlines() if words in line]


def keep_copy(repository: Path, version: int, tmp_path: Path) -> Path:
    """A copy of a version's model.onnx outside the repository: the reference for its answers."""
    copy = tmp_path / f"v{version}-original.onnx"
    shutil.copyfile(repository / "mnist" / str(version) / "model.onnx", copy)
    return copy


def settle() -> None:
    time.sleep(
        1.5
    )  # several polls: a refusal is logged and counted once per change, not once per poll


def test_model_onnx_rewritten_in_place_keeps_the_loaded_copy_serving(
    repository, mnist_test_set, version_reference, tmp_path
):
    images, _ = mnist_test_set
    served = repository / "mnist" / "1" / "model.onnx"
    original = keep_copy(repository, 1, tmp_path)
    good = original.read_bytes()
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=9).start()
        try:
            time.sleep(1)
            with open(served, "r+b") as handle:  # garbage over the file the session was opened from
                handle.write(os.urandom(4096))
            wait_for(lambda: failures(server, "checksum") == 1, 60, "the garbage refused")
            settle()
            served.write_bytes(good[: len(good) // 3])  # truncated in place (same inode)
            wait_for(lambda: failures(server, "checksum") == 2, 60, "the truncated file refused")
            settle()
            counted = failures(server, "checksum")
            refusals = log_lines(server, "model 'mnist' version 1 refused (checksum)")
            served.write_bytes(good)  # restored: the same model, nothing to reload
            wait_for(
                lambda: log_lines(server, "its files changed but its model did not"),
                60,
                "the restore",
            )
            publish(
                repository, "mnist", 2, variant_bytes(original, seed=3)
            )  # a valid version appears
            wait_for(
                lambda: any(a.version == "2" for a in load.answers), 60, "answers from version 2"
            )
            time.sleep(1)
        finally:
            load.stop()
    assert not load.failures, load.failures[:5]
    assert counted == 2, counted
    assert len(refusals) == 2 and all(
        "keeps serving the copy it loaded" in line for line in refusals
    ), refusals
    assert {a.version for a in load.answers} == {"1", "2"}
    files = {("mnist", "1"): original, ("mnist", "2"): repository / "mnist" / "2" / "model.onnx"}
    assert wrong_answers(load.answers, files, images[:1000], version_reference) == []


def test_metadata_sha256_edited_is_refused_and_a_new_version_takes_over(
    repository, mnist_test_set, version_reference, tmp_path
):
    images, _ = mnist_test_set
    metadata_path = repository / "mnist" / "1" / "metadata.json"
    original = keep_copy(repository, 1, tmp_path)
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=9).start()
        try:
            time.sleep(1)
            document = json.loads(metadata_path.read_text())
            document["model_sha256"] = "0" * 64
            metadata_path.write_text(json.dumps(document))
            wait_for(
                lambda: failures(server, "checksum") == 1, 60, "the edited metadata.json refused"
            )
            settle()
            counted = failures(server, "checksum")
            refusals = log_lines(server, "model 'mnist' version 1 refused (checksum)")
            publish(repository, "mnist", 2, variant_bytes(original, seed=5))
            wait_for(
                lambda: any(a.version == "2" for a in load.answers), 60, "answers from version 2"
            )
            wait_for(
                lambda: log_lines(server, "version 1 unloaded after its accepted calls finished"),
                30,
                "version 1 drained",
            )
        finally:
            load.stop()
    assert not load.failures, load.failures[:5]
    assert counted == 1 and len(refusals) == 1, refusals
    assert "does not match metadata.json" in refusals[0] and "keeps serving" in refusals[0]
    files = {("mnist", "1"): original, ("mnist", "2"): repository / "mnist" / "2" / "model.onnx"}
    assert wrong_answers(load.answers, files, images[:1000], version_reference) == []


def test_version_folders_deleted_while_calls_run_on_them(
    repository, mnist_test_set, version_reference, tmp_path
):
    """Deleting the served version moves calls to the one the policy picks from what remains
    (Triton's behaviour); deleting the last one keeps it serving from memory until a valid
    version appears, since unloading it would fail every call."""
    images, _ = mnist_test_set
    v1 = keep_copy(repository, 1, tmp_path)
    publish(repository, "mnist", 2, variant_bytes(v1, seed=7))
    v2 = keep_copy(repository, 2, tmp_path)
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=9).start()
        try:
            wait_for(
                lambda: any(a.version == "2" for a in load.answers), 60, "answers from version 2"
            )
            shutil.rmtree(repository / "mnist" / "2")
            wait_for(
                lambda: log_lines(server, "version 2 unloaded after its accepted calls finished"),
                60,
                "version 2 unloaded",
            )
            shutil.rmtree(repository / "mnist" / "1")  # the last one: nothing can take over
            wait_for(lambda: failures(server, "deleted") == 1, 60, "the deleted last version noted")
            settle()
            counted = failures(server, "deleted")
            kept = log_lines(server, "its folder was deleted but no other version can serve")
            still_one = [a for a in load.calls_since(time.time() - 1)]
            publish(repository, "mnist", 3, variant_bytes(v1, seed=9))
            wait_for(
                lambda: any(a.version == "3" for a in load.answers), 60, "answers from version 3"
            )
            wait_for(
                lambda: log_lines(server, "version 1 unloaded after its accepted calls finished"),
                30,
                "version 1 unloaded",
            )
        finally:
            load.stop()
    assert not load.failures, load.failures[:5]
    assert counted == 1 and len(kept) == 1, kept
    assert still_one and {a.version for a in still_one} == {"1"}
    assert {a.version for a in load.answers} == {"1", "2", "3"}
    files = {
        ("mnist", "1"): v1,
        ("mnist", "2"): v2,
        ("mnist", "3"): repository / "mnist" / "3" / "model.onnx",
    }
    assert wrong_answers(load.answers, files, images[:1000], version_reference) == []


def test_unparsable_config_pbtxt_keeps_the_last_good_one(
    repository, mnist_test_set, version_reference, tmp_path
):
    images, _ = mnist_test_set
    config = repository / "mnist" / "config.pbtxt"
    good = config.read_text()
    original = keep_copy(repository, 1, tmp_path)
    with start_server(repository, *POLL, log_path=tmp_path / "server.log") as server:
        load = Load(server.target, server.http_url, images[:1000], callers=9).start()
        try:
            time.sleep(1)
            config.write_bytes(b"\xff\xfe\x00garbage" + os.urandom(64))  # not even text
            wait_for(lambda: failures(server, "config") == 1, 60, "the binary config.pbtxt refused")
            settle()
            publish(
                repository, "mnist", 2, variant_bytes(original, seed=11)
            )  # served under the last good one
            wait_for(
                lambda: any(a.version == "2" for a in load.answers), 60, "answers from version 2"
            )
            config.write_text(
                "name: 'mnist' version_policy { latest { num_versions: 1 } "
            )  # unbalanced
            wait_for(
                lambda: failures(server, "config") == 2, 60, "the unbalanced config.pbtxt refused"
            )
            settle()
            counted = failures(server, "config")
            refusals = log_lines(server, "model 'mnist' config refused")
            config.write_text(
                good + "version_policy: { specific { versions: [1] } }\n"
            )  # fixed: asks for 1
            wait_for(
                lambda: any(a.version == "1" and a.started > time.time() - 1 for a in load.answers),
                60,
                "version 1 served again under the fixed config",
            )
        finally:
            load.stop()
        poll_errors = log_lines(server, "repository poll failed")
    assert not load.failures, load.failures[:5]
    assert not poll_errors, poll_errors[:2]
    assert counted == 2 and len(refusals) == 2, refusals
    assert all(
        "is not a valid Triton model configuration" in line and "last good one" in line
        for line in refusals
    ), refusals
    files = {("mnist", "1"): original, ("mnist", "2"): repository / "mnist" / "2" / "model.onnx"}
    assert wrong_answers(load.answers, files, images[:1000], version_reference) == []


# ---- a full disk while publishing ----


@pytest.fixture()
def small_disk(tmp_path, trained_repository):
    """A tmpfs half the size of the test model: room for small files, not for a model (root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    size_kib = (trained_repository / "mnist" / "1" / "model.onnx").stat().st_size // 2048
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs under CI=true: {done.stderr.strip()}")
        pytest.skip(f"needs root to mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_publishes_nothing(small_disk, trained_repository) -> None:
    model = (trained_repository / "mnist" / "1" / "model.onnx").read_bytes()
    first = write_version(small_disk, "mnist", model[:1000], ModelMetadata())  # fits: version 1
    assert first.version == 1
    config_before = (small_disk / "mnist" / "config.pbtxt").read_text()
    with pytest.raises(RepositoryError) as refused:
        write_version(small_disk, "mnist", model, ModelMetadata())
    message = str(refused.value)
    assert "no space left on device" in message and "nothing was published" in message
    assert "\n" not in message
    assert list_versions(small_disk, "mnist") == [1]
    assert sorted(p.name for p in (small_disk / "mnist").iterdir()) == [
        "1",
        "config.pbtxt",
    ]  # no staging left
    assert (small_disk / "mnist" / "config.pbtxt").read_text() == config_before


def test_mnist_train_on_a_full_disk_says_so_in_one_line(small_disk, mnist_path, tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.cli",
            "--out",
            str(small_disk),
            "--artifacts",
            str(tmp_path / "art"),
            "--limit",
            "600",
            "--epochs",
            "1",
            "--no-int8",
            "--seed",
            "3",
            "--data-dir",
            str(mnist_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode != 0, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnist-train: error")]
    assert len(errors) == 1 and "no space left on device" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert list_versions(small_disk, "mnist") == []
    assert [p.name for p in (small_disk / "mnist").iterdir()] == []  # no staging folder, no config
