"""Speed that does not depend on how callers connect: idle cores for large batches, REST on every
worker."""

from __future__ import annotations

import http.client
import math
import multiprocessing
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.contract import to_model_input
from core.repository import load_version
from serving.inference import activity
from serving.inference.runtime import OnnxRuntimeSession, RuntimeOptions
from serving.process import free_port, serve_command, start_server
from serving.rest_client import RestClient


def _busy_for(board, index: int, seconds: float) -> None:
    """Another worker process: it runs a 'batch' for `seconds`."""
    mine = activity.WorkerActivity(board, index)
    mine.started()
    time.sleep(seconds)
    mine.finished()


def test_a_worker_sees_across_processes_whether_the_others_run_batches(monkeypatch):
    # The machine's own load is beyond a test's control (this one is shared): take it as quiet.
    monkeypatch.setattr(activity.MACHINE, "crowded", lambda: False)
    context = multiprocessing.get_context("spawn")  # as serving.supervisor starts its workers
    board = activity.new_board(context, 2)
    me = activity.WorkerActivity(board, 0)
    assert me.others_idle()  # the other has never run a batch
    other = context.Process(target=_busy_for, args=(board, 1, 3.0))
    other.start()
    deadline = time.monotonic() + 30
    while board[1] != math.inf:  # the child is slow to start on a loaded machine
        assert time.monotonic() < deadline and other.is_alive()
        time.sleep(0.01)
    assert not me.others_idle()  # busy in another process
    me.started()
    assert board[0] == math.inf and not me.others_idle()  # my own batch does not count
    me.finished()
    other.join(30)
    assert other.exitcode == 0
    assert not me.others_idle() or time.monotonic() - board[1] > activity.IDLE_AFTER
    time.sleep(2 * activity.IDLE_AFTER)
    assert me.others_idle()  # finished a while ago: its core is free again


def test_large_batches_take_every_core_only_while_the_other_workers_idle(
    trained_repository, mnist_test_set
):
    model = str(load_version(trained_repository, "mnist").model_path)
    runtime = OnnxRuntimeSession(
        model, RuntimeOptions(device="cpu", intra_op_threads=2, multi_thread_min_batch=16)
    )
    wide, narrow = runtime.session, runtime.session_for(1, others_idle=True)
    assert wide is not narrow
    assert runtime.session_for(64, others_idle=True) is wide
    assert runtime.session_for(64, others_idle=False) is narrow  # the others' cores are taken
    assert runtime.session_for(15, others_idle=True) is narrow
    # Another batch of this worker runs on another thread: the two share the cores, one each.
    assert runtime.session_for(64, others_idle=True, alone=False) is narrow

    # The choice follows the board a worker joined; the answers do not depend on it.
    board = [-math.inf, -math.inf]
    batch = to_model_input(mnist_test_set[0][:64])
    saved = activity.current()
    try:
        activity.join(board, 0)
        alone = runtime.run(batch)
        board[1] = math.inf  # the other worker runs a batch now
        assert not activity.current().others_idle()
        shared = runtime.run(batch)
    finally:
        activity._current = saved
    np.testing.assert_allclose(alone, shared, atol=1e-5)
    assert board[0] > -math.inf  # this worker's runs were recorded


def test_a_crowded_machine_keeps_large_batches_on_one_thread(monkeypatch):
    # Measured on 2 cores: two threads won at load 4.5, lost by 2.5x at load 27-29.
    assert not activity.crowded(4.5, 2) and activity.crowded(27.0, 2)
    assert not activity.crowded(20.0, 8)  # the line scales with the cores
    board = [-math.inf, -math.inf]  # the other worker idles
    me = activity.WorkerActivity(board, 0)
    monkeypatch.setattr(activity.MACHINE, "crowded", lambda: True)
    assert not me.others_idle() and not activity.Alone().others_idle()
    monkeypatch.setattr(activity.MACHINE, "crowded", lambda: False)
    assert me.others_idle() and activity.Alone().others_idle()
    assert isinstance(activity.MACHINE.__class__().crowded(), bool)  # reads this machine's load


def _worker_images(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {
        sample.labels.get("pid", ""): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mnist_worker_images"
        for sample in family.samples
    }


@pytest.mark.timeout(240)
def test_rest_is_served_by_every_worker(trained_repository, mnist_test_set, tmp_path):
    images, labels = mnist_test_set
    with start_server(
        trained_repository, "--workers", "2", log_path=tmp_path / "server.log", ready_timeout=120
    ) as server:
        deadline = time.monotonic() + 120
        while server.log().count("serving ") < 2:  # start_server returns when one worker serves
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        correct = 0
        for k in range(40):  # a new connection each: the kernel spreads them over the workers
            with RestClient(f"127.0.0.1:{server.http_port}", timeout=30) as client:
                correct += int(np.argmax(client.infer(images[k : k + 1])[0]) == labels[k])
        per_worker = _worker_images(server.metrics_url)
    assert correct >= 30
    assert len(per_worker) == 2 and all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 40


def test_the_rest_port_is_still_refused_when_another_server_holds_it(trained_repository, tmp_path):
    """Sharing the port is for the workers only: a second server must not join a first one's."""
    with start_server(trained_repository, "--workers", "1", log_path=tmp_path / "a.log") as first:
        result = subprocess.run(
            serve_command(
                trained_repository, "--workers", "2", port=free_port(), http_port=first.http_port
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert str(first.http_port) in result.stderr and "Traceback" not in result.stderr
        conn = http.client.HTTPConnection("127.0.0.1", first.http_port, timeout=10)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200  # the first server still answers
