"""REST in operation: its metrics, draining under load, ports, mnist-predict and Locust over REST."""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request

import pytest

from serving.process import free_port, serve_command, start_server
from serving.rest_client import RestClient, RestError
from tests.support.common import ROOT, predict_args, run_predict
from tests.support.loadtest_runs import locust_args, run_module


def test_metrics_count_http_calls(server, rest, mnist_test_set):
    def count(code: str) -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        prefix = f'mnist_requests_total{{code="{code}",method="POST /v2/models/{{model}}/infer",'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    ok, bad = count("200"), count("404")
    rest.infer(mnist_test_set[0][:1])
    with pytest.raises(RestError) as refused:
        rest.infer(mnist_test_set[0][:1], model_name="resnet")
    assert refused.value.status == 404
    assert count("200") == ok + 1 and count("404") == bad + 1
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    # The answered call names its model and version; the refused one no model answered has them empty.
    assert 'code="200",method="POST /v2/models/{model}/infer",model="mnist",version="1"}' in text
    assert 'code="404",method="POST /v2/models/{model}/infer",model="",version=""}' in text


def test_sigterm_during_rest_load_loses_no_accepted_call(
    trained_repository, mnist_test_set, reference, tmp_path
):
    images = mnist_test_set[0][:32]
    expected = reference(images).argmax(axis=1).tolist()
    server = start_server(
        trained_repository, "--grace-period", "10", log_path=tmp_path / "server.log"
    )
    outcomes: list[object] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller():
        with RestClient(f"127.0.0.1:{server.http_port}", timeout=20) as client:
            while not stop.is_set():
                try:
                    outcome = (
                        "ok"
                        if client.infer(images).argmax(axis=1).tolist() == expected
                        else "wrong answer"
                    )
                except RestError as error:
                    outcome = error.status
                except OSError:  # the port closed after the drain: no call was accepted there
                    outcome = "closed"
                with lock:
                    outcomes.append(outcome)
                if outcome != "ok":
                    return

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    while len(outcomes) < 50:
        threading.Event().wait(0.05)
    assert RestClient(f"127.0.0.1:{server.http_port}").is_ready()
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(30)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert exit_code == 0, server.log()
    assert outcomes.count("ok") >= 50
    # Every call either completed correctly or was refused: 503 while draining, or the port closed.
    assert set(outcomes) <= {"ok", 503, "closed"}, set(map(str, outcomes))


def test_a_taken_http_port_is_one_clear_line(server, trained_repository):
    result = subprocess.run(
        serve_command(trained_repository, port=free_port(), http_port=server.http_port),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "choose another --http-port" in result.stderr.strip().splitlines()[-1]


def test_http_port_0_turns_rest_off(trained_repository, tmp_path):
    with start_server(
        trained_repository, "--http-port", "0", log_path=tmp_path / "server.log"
    ) as server:
        assert "HTTP on :off" in server.log()


def test_mnist_predict_over_rest(server, mnist_path):
    rest = ("--api", "rest")
    target = f"127.0.0.1:{server.http_port}"
    result = run_predict(*rest, *predict_args(target, mnist_path, 200), "--quiet")
    assert result.returncode == 0, result.stderr
    correct = int(result.stdout.split("accuracy: ")[1].split("/")[0])
    assert correct >= 180, result.stdout
    refused = run_predict(*rest, *predict_args(target, mnist_path, 65), "--batch-size", "65")
    assert (
        refused.returncode == 1 and refused.stderr.count("\n") == 1 and "HTTP 400" in refused.stderr
    )


@pytest.mark.timeout(120)
def test_locust_load_mixing_rest_and_grpc_has_no_failures(server, mnist_path, tmp_path):
    from loadtest.locust_args import rest_request_name
    from loadtest.locust_report import read_stats_csv

    result = run_module(
        "loadtest.run",
        *("--host", server.target, "--http-host", f"127.0.0.1:{server.http_port}"),
        *locust_args("mix", 4, "4s", 500, tmp_path, "rest"),
        *("--mix-weights", "2,1,1,2"),
        mnist_path=mnist_path,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = read_stats_csv(tmp_path / "rest_stats.csv")
    assert stats["Aggregated"].failures == 0
    for name in (rest_request_name(), "KServe ModelInfer x1", "Classify x1"):
        assert stats[name].requests > 0 and stats[name].failures == 0, name
