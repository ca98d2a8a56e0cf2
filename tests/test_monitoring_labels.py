"""Several models and versions served at once: each call and batch is counted under the model
and version that answered it, and a retired version's gauges go while its counters keep their
history (the labels the dashboard's $model and $version select)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from tests.support.prometheus import series, wait_for


def _two_models(trained_repository: Path, repository: Path) -> None:
    """mnist with versions 1 and 2 both served, and a second model `digits` (version 1)."""
    shutil.copytree(trained_repository, repository)
    shutil.copytree(repository / "mnist" / "1", repository / "mnist" / "2")
    with open(repository / "mnist" / "config.pbtxt", "a") as config:
        config.write("version_policy: { all { } }\n")  # both versions serve
    shutil.copytree(repository / "mnist", repository / "digits")
    shutil.rmtree(repository / "digits" / "2")
    config = repository / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mnist"', 'name: "digits"'))


def _call_each(server, images) -> None:
    from serving.client import ClassifierClient
    from serving.rest_client import RestClient

    with ClassifierClient(server.target, timeout=30) as client:
        client.classify(images[:3], model_version="1")
        client.classify(images[:2], model_version="2")
        client.infer_kserve(images[:4])  # no version: the newest, 2
        client.classify(images[:1], model_name="digits")
        with pytest.raises(grpc.RpcError):
            client.classify(images[:1], model_version="7")  # NOT_FOUND: no version answered
    with RestClient(f"127.0.0.1:{server.http_port}", timeout=30) as rest:
        rest.infer(images[:5], model_name="digits")


def _model_versions(url: str, name: str, value=None) -> set[tuple[str, str]]:
    """(model, version) of every sample called `name` (with that value, when one is given)."""
    return {
        (dict(k)["model"], dict(k)["version"])
        for k, v in series(url, name).items()
        if value is None or v == value
    }


def _check_counted(url: str) -> None:
    def calls(method: str, code: str) -> dict[tuple[str, str], float]:
        return {
            (dict(k)["model"], dict(k)["version"]): v
            for k, v in series(url, "mnist_requests_total").items()
            if dict(k)["method"] == method and dict(k)["code"] == code
        }

    assert calls("Classify", "OK") == {("mnist", "1"): 1, ("mnist", "2"): 1, ("digits", "1"): 1}
    assert calls("ModelInfer", "OK") == {("mnist", "2"): 1}
    assert calls("Classify", "NOT_FOUND") == {("", ""): 1}
    assert calls("POST /v2/models/{model}/infer", "200") == {("digits", "1"): 1}
    images_by_version = {
        tuple(v for _, v in k): n for k, n in series(url, "mnist_images_total").items() if n
    }  # (the repository may hold other models, e.g. mnist_int8: they classified nothing)
    assert images_by_version == {("mnist", "1"): 3, ("mnist", "2"): 6, ("digits", "1"): 6}
    batches = {
        tuple(v for _, v in k): n for k, n in series(url, "mnist_batch_size_count").items() if n
    }
    assert batches == {("mnist", "1"): 1, ("mnist", "2"): 2, ("digits", "1"): 2}
    versions = _model_versions(url, "mnist_queue_capacity")
    assert versions >= {("mnist", "1"), ("mnist", "2"), ("digits", "1")}


def test_each_call_and_batch_names_the_model_and_version_that_answered(
    trained_repository, tmp_path, mnist_test_set
):
    """Two versions of mnist and a second model served at once; a retired version's gauges go."""
    from serving.process import start_server

    repository = tmp_path / "model_repository"
    _two_models(trained_repository, repository)
    with start_server(
        repository,
        *("--workers", "1", "--repository-poll-secs", "1"),
        log_path=tmp_path / "server.log",
    ) as server:
        url = server.metrics_url
        _call_each(server, mnist_test_set[0])
        _check_counted(url)

        # Version 2 leaves the repository: once it is unloaded its gauges go; version 1's stay.
        shutil.rmtree(repository / "mnist" / "2")

        def gone() -> bool:
            depth = _model_versions(url, "mnist_queue_depth")
            return ("mnist", "2") not in depth and ("mnist", "1") in depth

        wait_for(gone, 60, "version 2's queue gauges to go")
        info = _model_versions(url, "mnist_model_info", value=1)
        assert ("mnist", "2") not in info and {("mnist", "1"), ("digits", "1")} <= info
        capacity = _model_versions(url, "mnist_queue_capacity")
        assert ("mnist", "2") not in capacity and {("mnist", "1"), ("digits", "1")} <= capacity
        history = series(url, "mnist_images_total")
        assert history[(("model", "mnist"), ("version", "2"))] == 6  # counters keep their history
