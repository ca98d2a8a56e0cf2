"""The bench scripts' shared load generator and what users read: make bench and the curve."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import (
    Sample,
    measure,
    merge,
    payload_cycles,
    percentile_ms,
    rest_closed_loop,
    spread,
    table,
)
from serving.process import free_port, wait_until_serving
from tests.support.loadtest_runs import run_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def canned():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.canned_server", "--port", str(port)], cwd=ROOT
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", 60, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_callers_are_spread_over_the_connections():
    assert spread(5, 1) == [0, 0, 0, 0, 0]
    assert spread(5, 2) == [0, 1, 0, 1, 0]
    assert spread(2, 8) == [0, 1]  # never more connections than callers


def test_callers_take_turns_over_several_payloads():
    assert [next(c) for c in payload_cycles(b"x", 2)] == [b"x", b"x"]
    cycles = payload_cycles([b"0", b"1", b"2", b"3", b"4"], 2)
    assert [next(cycles[0]) for _ in range(4)] == [b"0", b"2", b"4", b"0"]
    assert [next(cycles[1]) for _ in range(3)] == [b"1", b"3", b"1"]
    assert [next(c) for c in payload_cycles([b"a"], 3)] == [b"a"] * 3  # more callers than payloads


def test_the_rest_closed_loop_counts_what_is_not_200():
    from aiohttp import web

    async def run(status: int, shared: bool) -> Sample:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(status=status)

        app = web.Application()
        app.router.add_post("/infer", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await rest_closed_loop(
                f"http://127.0.0.1:{port}/infer",
                (b"{}", {"Content-Type": "application/json"}),
                callers=3,
                seconds=0.3,
                warmup=0.05,
                connection_per_caller=not shared,
                timeout=5,
            )
        finally:
            await runner.cleanup()

    for shared in (False, True):
        ok = asyncio.run(run(200, shared))
        assert ok.errors == 0 and len(ok.latencies) > 10, ok
        failing = asyncio.run(run(503, shared))
        assert failing.errors > 10 and not failing.latencies, failing


def test_closed_loop_from_one_connection_and_from_many(canned):
    from bench.bench_serving import infer_payload
    from bench.common import test_images

    payload = infer_payload(test_images()[:2], "mnist")
    for connections in (1, 3):
        sample = measure(canned, payload, callers=4, connections=connections, seconds=0.5)
        assert sample.errors == 0 and len(sample.latencies) > 10, sample
        assert 0 < percentile_ms(sample.latencies, 50) <= percentile_ms(sample.latencies, 99)
        assert sample.client_cpu_s > 0, sample  # the generator's own CPU over the window
    refused = measure("127.0.0.1:1", payload, callers=1, seconds=0.2, timeout=0.5, warmup=0)
    assert refused.errors > 0 and not refused.latencies  # counted, never raised

    both = merge([Sample((0.001, 0.002), 1, 1.0), Sample((0.003,), 0, 2.0)])
    assert (len(both.latencies), both.errors, both.seconds) == (3, 1, 3.0)
    text = table(
        [{"name": "a", "x": 1.5}, {"name": "bb", "x": float("nan")}], [("name", ""), ("x", ".1f")]
    )
    assert text.splitlines()[2:] == ["a     1.5", "bb      -"]


def test_the_tritonclient_generator_sends_the_same_request_from_its_own_process(canned):
    from bench.bench_serving import infer_payload
    from bench.common import measure_with_tritonclient, test_images

    payload = infer_payload(test_images()[:3], "mnist")
    windows = []
    for connections in (1, 3):
        sample = measure_with_tritonclient(
            canned,
            payload,
            callers=4,
            connections=connections,
            seconds=0.5,
            on_window=lambda: windows.append(connections),
        )
        assert sample.errors == 0 and len(sample.latencies) > 10, sample
        assert sample.client_cpu_s > 0, sample
    assert windows == [1, 1, 3, 3]  # the window opened and closed, as the process reported


def short_bench(repository, mnist_path, tmp_path, *flags: str, timeout: float = 540):
    """`make bench` in short slices with `flags`: (its output, the figures of its --json)."""
    result = run_module(
        "bench.bench_serving",
        "--model-repository",
        str(repository),
        "--no-int8",
        "--seconds",
        "0.4",
        "--rounds",
        "1",
        "--in-process-seconds",
        "0.2",
        "--json",
        str(tmp_path / "b.json"),
        *flags,
        mnist_path=mnist_path,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads((tmp_path / "b.json").read_text())


@pytest.mark.timeout(600)
def test_make_bench_runs_every_scenario_from_one_connection_and_from_eight(
    trained_repository, mnist_path, tmp_path
):
    output, figures = short_bench(
        trained_repository, mnist_path, tmp_path, "--variant", "one-thread=--intra-op-threads 1"
    )
    seen = {
        (r["target"], r["callers"], r["images_per_call"], r["connections"])
        for r in figures["results"]
    }
    for target in ("mnist-serve", "one-thread", "naive", "aio-inline", "canned"):
        for scenario in ((1, 1, 1), (32, 1, 1), (32, 1, 8), (8, 64, 1), (8, 64, 8)):
            assert (target, *scenario) in seen, (target, scenario)
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in figures["results"])
    for goal in (
        "32 x 1, 1 conn:",
        "32 x 1, 8 conn:",
        "8 x 64, 1 conn:",
        "8 x 64, 8 conn:",
        "in-process at its best",
        "1 x 1 p50:",
        "mnist-serve's layers add",
        "errors: 0: met",
    ):
        assert goal in output, output


@pytest.mark.timeout(300)
def test_one_scenario_alone_for_quick_comparisons(trained_repository, mnist_path, tmp_path):
    output, figures = short_bench(
        trained_repository, mnist_path, tmp_path, "--scenario", "1x1/1", timeout=240
    )
    assert {(r["callers"], r["images_per_call"], r["connections"]) for r in figures["results"]} == {
        (1, 1, 1)
    }
    assert "1 x 1 p50:" in output and "32 x 1" not in output, output


@pytest.mark.timeout(300)
def test_make_bench_with_tritonclient_as_the_load_generator(
    trained_repository, mnist_path, tmp_path
):
    output, figures = short_bench(
        trained_repository,
        mnist_path,
        tmp_path,
        "--scenario",
        "8x64/8",
        "--generator",
        "tritonclient",
        timeout=240,
    )
    assert "load generator: tritonclient" in output, output
    results = figures["results"]
    assert {r["target"] for r in results} == {"mnist-serve", "naive", "aio-inline", "canned"}
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in results), results
    assert all(r["client_cpu_ms_per_call"] > 0 for r in results), results


@pytest.mark.timeout(400)
def test_the_curve_sweeps_concurrency_for_both_servers(trained_repository, mnist_path, tmp_path):
    out = tmp_path / "curve.png"
    result = run_module(
        "bench.curve",
        "--model-repository",
        str(trained_repository),
        "--concurrency",
        "1,4",
        "--sizes",
        "1,64",
        "--seconds",
        "0.3",
        "--rounds",
        "1",
        "--out",
        str(out),
        mnist_path=mnist_path,
        timeout=360,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out.with_suffix(".csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    points = {(r["server"], int(r["images/call"]), int(r["concurrency"])) for r in rows}
    assert points == {(s, n, c) for s in ("mnist-serve", "naive") for n in (1, 64) for c in (1, 4)}
    assert all(float(r["calls/s"]) > 0 and int(r["errors"]) == 0 for r in rows)
