"""The load generator's ceiling: the same Locust users and scenario against a server that answers
without a model (bench/canned_server.py), in the same run, and what it says about the figures.

When a run against mnist-serve reaches most of what the same Locust can send to a server that does
nothing, the figures describe Locust, not the server: `verdict` says so and prints the ceiling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.locust_args import LoadTestError
from loadtest.locust_runner import ROOT, LocustRun, run_locust

# A run at 80 % or more of the ceiling is bound by the load generator: the server could answer
# faster than Locust asks. (Measured here, one Locust process on 2 cores: 32 mix users reached 1,254
# calls/s # against mnist-serve, which answered a grpc.aio generator at over 2,000.)
BOUND_AT = 0.80
NO_CANNED = ("rest",)  # the canned server has no REST port


def ceiling_scenario(scenario: str, mix_weights: str) -> tuple[str, str] | None:
    """The scenario (and weights) to run against the canned server: REST calls left out of a mix;
    None when nothing of the scenario can run there."""
    if scenario in NO_CANNED:
        return None
    if scenario == "mix":
        weights = mix_weights.split(",")[:3]
        return (scenario, ",".join(weights)) if any(w.strip() != "0" for w in weights) else None
    return scenario, mix_weights


def run_against_canned(csv_prefix: Path, log_path: Path, **locust) -> LocustRun:
    """Start the canned server on a free port, run Locust against it, stop it."""
    from serving.process import free_port, wait_until_serving

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.canned_server", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_until_serving(f"127.0.0.1:{port}", 30, proc)
        except (RuntimeError, TimeoutError) as error:
            raise LoadTestError(
                f"the canned server for the ceiling did not start: {error}"
            ) from None
        return run_locust(
            f"127.0.0.1:{port}",
            csv_prefix=csv_prefix,
            log_path=log_path,
            reset_stats=True,
            **locust,
        )
    finally:
        proc.terminate()
        proc.wait(30)


def verdict(calls_per_s: float, ceiling_per_s: float) -> str:
    """One line: bound by the load generator, or by the server."""
    if ceiling_per_s <= 0:
        return "no ceiling measured: the canned run completed no call"
    share = calls_per_s / ceiling_per_s
    if share < BOUND_AT:
        return (
            f"bound by the server: this run reached {100 * share:.0f} % of the load generator's "
            f"ceiling ({ceiling_per_s:,.1f} requests/s against a server with no model)"
        )
    # Above 100 %: the machine got busier between the two runs (others share it); still bound.
    drift = (
        " (more than the ceiling: the machine's load changed between the runs)" if share > 1 else ""
    )
    return (
        f"BOUND BY THE LOAD GENERATOR: this run reached {100 * share:.0f} % of what these Locust "
        f"users send to a server with no model ({ceiling_per_s:,.1f} requests/s){drift}; the "
        "server's own figures above are its speed, Locust's are Locust's. More --processes or "
        "machines for Locust (docs/load-testing.md) move the ceiling"
    )
