"""Structured logs: --log-format json writes one JSON object a line (time, level, logger, message,
worker, pid; trace_id and span_id inside a traced call), text stays the default; real servers."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime

import grpc

from bench.otlp_sink import OtlpReceiver
from serving import tracing
from serving.log_setup import JsonFormatter
from serving.process import start_server
from tests.support.common import ROOT
from tests.support.lifecycle import wait_for

KEYS = {"time", "level", "logger", "message", "worker", "pid"}


def json_lines(text: str) -> list[dict]:
    """Every line of a server's output, parsed; a line that is no JSON object fails the test."""
    records = []
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict) and KEYS <= set(record), line
            records.append(record)
    return records


def test_text_stays_the_default(trained_repository, tmp_path):
    with start_server(
        trained_repository, "--workers", "1", log_path=tmp_path / "server.log"
    ) as server:
        pass
    lines = [line for line in server.log().splitlines() if line.strip()]
    serving = next(line for line in lines if " serving " in line)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mnist-serve: serving ", serving), (
        serving
    )
    assert not any(line.startswith("{") for line in lines)


def test_json_lines_name_time_level_logger_and_worker(trained_repository, tmp_path):
    with start_server(
        trained_repository,
        "--workers",
        "1",
        "--log-format",
        "json",
        log_path=tmp_path / "server.log",
    ) as server:
        pass  # started (SERVING), then drained and stopped: every phase has logged
    records = json_lines(server.log())
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving mnist 1") for m in messages), messages
    assert any(m == "stopped" for m in messages), messages
    for record in records:
        assert record["worker"] == 0 and record["pid"] == server.proc.pid
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    assert {r["logger"] for r in records} >= {"mnist-serve", "serving.inference.runtime"}
    assert not any("trace_id" in r for r in records)  # tracing is off


def test_json_lines_of_workers_name_their_worker(trained_repository, tmp_path):
    with start_server(
        trained_repository,
        "--workers",
        "2",
        "--log-format",
        "json",
        log_path=tmp_path / "server.log",
    ) as server:
        wait_for(
            lambda: sum('"message": "serving ' in line for line in server.log().splitlines()) == 2,
            timeout=60,
            what="both workers to log that they serve",
        )
    records = json_lines(server.log())
    serving = sorted(r["worker"] for r in records if r["message"].startswith("serving "))
    assert serving == [0, 1]
    parent = [r for r in records if r["message"].startswith("2 workers on ")]
    assert parent and parent[0]["worker"] is None and parent[0]["pid"] == server.proc.pid
    assert len({r["pid"] for r in records if r["worker"] is not None}) == 2


def test_json_lines_inside_a_traced_call_carry_its_trace_and_span(trained_repository, tmp_path):
    """A malformed request logs a warning from inside the call: the line names the call's span."""
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with start_server(
            trained_repository,
            "--workers",
            "1",
            "--log-format",
            "json",
            env=env,
            log_path=tmp_path / "server.log",
        ) as server:
            parent = tracing.new_traceparent()
            with grpc.insecure_channel(server.target) as channel:
                classify = channel.unary_unary(
                    "/mnist.v1.Classifier/Classify"
                )  # bytes in, bytes out
                try:
                    classify(
                        b"\xff\xfe not a protobuf", timeout=30, metadata=[("traceparent", parent)]
                    )
                except grpc.RpcError as error:
                    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            trace_id = tracing.trace_id_of(parent)
            spans = receiver.wait_for(lambda s: any(x.trace_id == trace_id for x in s))
            wait_for(lambda: "malformed protobuf" in server.log(), timeout=30, what="the warning")
        records = json_lines(server.log())
    warning = next(r for r in records if "malformed protobuf" in r["message"])
    assert warning["level"] == "warning"
    call = next(s for s in spans if s.trace_id == trace_id and s.kind == 2)
    assert (warning["trace_id"], warning["span_id"]) == (trace_id, call.span_id)
    assert not any("trace_id" in r for r in records if r["message"].startswith("serving "))


def test_a_bad_log_format_is_one_line(trained_repository):
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--model-repository", str(trained_repository)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "MNIST_SERVE_LOG_FORMAT": "xml"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mnist-serve: error: MNIST_SERVE_LOG_FORMAT=xml: choose one of text, json"
    ]


def test_an_exception_stays_on_one_json_line():
    """The formatter itself: a traceback and a multi-line message become fields of one line."""
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.getLogger("mnist-serve").makeRecord(
            "mnist-serve", logging.ERROR, __file__, 1, "failed: %s", ("x\ny",), sys.exc_info()
        )
    line = JsonFormatter(worker=3).format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (
        parsed["message"] == "failed: x\ny" and parsed["worker"] == 3 and parsed["level"] == "error"
    )
    assert "RuntimeError: boom" in parsed["exception"]
