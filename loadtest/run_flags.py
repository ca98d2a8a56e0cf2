"""`python -m loadtest.run`'s flags, one function per `--help` group (loadtest/run.py builds
the parser); defaults from loadtest/options.py, shared with the locustfile."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.locust_runner import ROOT
from loadtest.options import DEFAULTS, SCENARIOS


def add_target_flags(parser: argparse.ArgumentParser) -> None:
    """What to load: a server this script starts, or one that runs."""
    target = parser.add_argument_group("what to load")
    target.add_argument(
        "--model-repository",
        type=Path,
        default=ROOT / "model_repository",
        help="start mnist-serve on the latest model here (ignored with --host)",
    )
    target.add_argument(
        "--host", help="host:port of an mnist-serve that already runs; no server is started"
    )
    target.add_argument(
        "--http-host",
        help="host:port of that server's REST API, for the rest scenario "
        "(default: --host's host, port 8000)",
    )
    target.add_argument(
        "--server-args",
        default="",
        help="extra mnist-serve flags for the server this script starts, "
        "e.g. --server-args='--max-batch-size 32'",
    )


def add_load_flags(parser: argparse.ArgumentParser) -> None:
    """The load: scenario, users, duration, what the calls ask for."""
    load = parser.add_argument_group("the load")
    load.add_argument("--scenario", choices=SCENARIOS, default=DEFAULTS.scenario)
    load.add_argument("--users", "-u", type=int, default=DEFAULTS.users, help="simulated clients")
    load.add_argument(
        "--spawn-rate",
        "-r",
        type=float,
        default=DEFAULTS.spawn_rate,
        help="users started per second",
    )
    load.add_argument(
        "--run-time",
        "-t",
        default=DEFAULTS.run_time,
        help="how long, in Locust's notation (60s, 2m, 1m30s)",
    )
    load.add_argument(
        "--images-per-call",
        type=int,
        default=DEFAULTS.images_per_call,
        help="images per call in the batch scenario",
    )
    load.add_argument(
        "--mix-weights",
        default=DEFAULTS.mix_weights_text,
        help="relative weights of single,batch,kserve calls in the mix scenario; "
        "a fourth weight mixes in rest calls (e.g. 6,3,1,2)",
    )
    load.add_argument(
        "--model-name",
        default="",
        help="the model the calls ask for (default: the server's default)",
    )
    load.add_argument(
        "--model-version",
        default="",
        help="the version the calls ask for (default: the newest ready one; answers are judged "
        "against the version that computed them)",
    )
    load.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULTS.pool_size,
        help="MNIST test images screened at start; the ones the idle server gets right are sent",
    )
    _add_run_flags(load)


def _add_run_flags(load: argparse._ArgumentGroup) -> None:
    """The rest of the load group: Locust's processes, the server's /metrics, the ceiling run."""
    load.add_argument(
        "--processes",
        type=int,
        default=None,
        help="run Locust on this many worker processes (-1: one per CPU) for more load "
        "than one process can make; default: one per two cores, the other half "
        "left to the server (one process below four cores)",
    )
    load.add_argument(
        "--metrics-url",
        default="",
        help="the server's Prometheus /metrics, for its own view of the load window "
        "(default: the server this script starts; with --host, port 9100 of its host)",
    )
    load.add_argument(
        "--ceiling-run-time",
        default="20s",
        help="how long the same users and scenario run against a server with no model "
        "(the load generator's ceiling); 0: skip it",
    )


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """Where the reports go, and how long to wait for the server."""
    out = parser.add_argument_group("reports")
    out.add_argument("--reports-dir", type=Path, default=ROOT / "reports")
    out.add_argument("--name", default="loadtest", help="file name stem of the reports")
    out.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the server's health check before giving up",
    )
    out.add_argument(
        "--verbose", action="store_true", help="show Locust's own output instead of logging it"
    )
