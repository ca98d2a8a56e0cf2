"""Draining and health, without races: calls are held in the server's queue on purpose.

A server started with a long --max-queue-delay-us keeps a lone call waiting for company, so
the test knows which calls were accepted (they are in the queue: mnist_queue_depth says so)
before it sends SIGTERM/SIGINT. Then every accepted call must be answered correctly, every new
call refused with the server's own words, and health must say NOT_SERVING.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from core.repository import load_version
from tests.support.common import ROOT
from tests.support.draining import REFUSAL, classify, health, hold_calls, start_holding_server
from tests.support.lifecycle import wait_for

SERVICES = ("", "mnist.v1.Classifier", "inference.GRPCInferenceService")


@pytest.fixture(scope="module")
def expected_labels(trained_repository, mnist_test_set):
    """What in-process onnxruntime answers for the first 8 test images."""
    session = ort.InferenceSession(
        str(load_version(trained_repository, "mnist").model_path),
        providers=["CPUExecutionProvider"],
    )
    images = (mnist_test_set[0][:8].astype(np.float32) / 255)[..., None]
    return session.run(None, {"images": images})[0].argmax(axis=1).tolist()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_drains_answers_every_accepted_call_and_refuses_new_ones(
    signal_name, trained_repository, mnist_test_set, expected_labels, tmp_path
):
    images, _ = mnist_test_set
    # Held calls wait up to 6 s from the first one's arrival: time enough to look at the draining server.
    server = start_holding_server(trained_repository, tmp_path / "server.log", 6_000_000, 30)
    try:
        held = hold_calls(server, images[:8])
        server.proc.send_signal(getattr(signal, signal_name))
        wait_for(lambda: health(server.target) == "NOT_SERVING", 30, "NOT_SERVING")
        assert [health(server.target, service) for service in SERVICES] == ["NOT_SERVING"] * 3
        # A new call is refused before it is accepted, in the server's own words (not a dropped call).
        assert classify(server.target, images[8]) == ("UNAVAILABLE", REFUSAL)
        if signal_name == "SIGTERM":  # the container healthcheck fails while draining
            probe = subprocess.run(
                [sys.executable, "-m", "serving.health_probe", "--target", server.target],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert probe.returncode != 0 and "NOT_SERVING" in probe.stdout + probe.stderr, probe
            assert server.proc.poll() is None, "the held calls must still be waiting"
        # Every accepted call is answered, with what onnxruntime computes.
        assert [call() for call in held] == [("ok", label) for label in expected_labels]
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
    assert "draining" in server.log()


def test_calls_still_queued_when_the_grace_period_ends_are_cancelled(
    trained_repository, mnist_test_set, tmp_path
):
    images, _ = mnist_test_set
    # Held for 10 minutes, far beyond a 1 s grace period: only its end can release them.
    server = start_holding_server(trained_repository, tmp_path / "server.log", 600_000_000, 1)
    try:
        held = hold_calls(server, images[:2])
        server.proc.send_signal(signal.SIGTERM)
        assert [call() for call in held] == [("UNAVAILABLE", "Cancelling all calls")] * 2
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
    assert "grace period over with calls still queued: they are cancelled" in server.log()


def test_not_serving_until_the_model_is_warm(trained_repository, tmp_path):
    """Before warm-up ends nothing reports SERVING; after, everything does."""
    import os

    from serving.process import free_port, serve_command, wait_until_serving

    port, log_path = free_port(), tmp_path / "server.log"
    # Enough warm-up runs (a batch of 1 and of 64 each) to take seconds on any machine.
    args = serve_command(trained_repository, "--workers", "1", "--warmup-runs", "400", port=port)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait_for(lambda: "configuration:" in log_path.read_text(), 30, "the server to start")
        target = f"127.0.0.1:{port}"
        probes = 0
        # "passed its checks" is logged once warm-up is done, before the ports open: a probe that began
        # before that line must not find SERVING.
        while "passed its checks" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert health(target) != "SERVING"
            probes += 1
        assert probes > 0, "warm-up ended before any probe: raise --warmup-runs"
        wait_until_serving(target, 60, proc)
        assert [health(target, service) for service in SERVICES] == ["SERVING"] * 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
