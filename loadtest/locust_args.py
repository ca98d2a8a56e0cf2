"""What the locustfile and the scripts that run it agree on: the request names (the rows of the
stats CSV), and the parsing of the options both read (--mix-weights, --host, the run time).

Only the standard library is imported: the locustfile imports this module too.
"""

from __future__ import annotations

import re


class LoadTestError(Exception):
    """A load test that could not run or finished badly; the message is one line for the user."""


# --- what the locustfile calls each request (and what the CSV rows are named) ---------------


def single_request_name() -> str:
    return "Classify x1"


def batch_request_name(images_per_call: int) -> str:
    return f"Classify x{images_per_call}"


def kserve_request_name() -> str:
    return "KServe ModelInfer x1"


def rest_request_name() -> str:
    return "REST infer x1"


def request_names(scenario: str, images_per_call: int) -> list[str]:
    """The request names a scenario produces (the rows of the stats CSV, besides Aggregated)."""
    names = {
        "single": [single_request_name()],
        "batch": [batch_request_name(images_per_call)],
        "kserve": [kserve_request_name()],
        "rest": [rest_request_name()],
    }
    if scenario == "mix":
        return [name for key in ("single", "batch", "kserve") for name in names[key]]
    return names[scenario]


def parse_mix_weights(text: str) -> tuple[int, ...]:
    """'6,3,1' -> (6, 3, 1): the relative weights of single, batch and kserve calls in `mix`;
    a fourth, '6,3,1,2', mixes in REST calls (KServe v2 over HTTP)."""
    try:
        weights = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        weights = ()
    if len(weights) not in (3, 4) or any(w < 0 for w in weights) or sum(weights) == 0:
        raise LoadTestError(
            f"--mix-weights {text!r}: give three non-negative integers for single,batch,kserve "
            "(or four, with rest) with at least one above zero, e.g. 6,3,1 or 6,3,1,2"
        )
    return weights  # type: ignore[return-value]


def normalize_target(host: str) -> str:
    """Locust's --host as a gRPC target: 'host:port', with an optional 'grpc://' stripped, or a target
    that names several replicas ('dns:///host:port', 'ipv4:a:port,b:port'), kept as it is: the
    users' client balances per call over all of them."""
    target = (host or "").strip().rstrip("/")
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        return target
    if target.startswith("grpc://"):
        target = target[len("grpc://") :]
    if not target or "://" in target or "/" in target or ":" not in target:
        raise LoadTestError(
            f"--host {host!r}: give the server as host:port (e.g. 127.0.0.1:8500), "
            "optionally with grpc://, or replicas as dns:///host:port or ipv4:a:port,b:port; "
            "not an HTTP URL"
        )
    return target


def parse_seconds(span: str | int | float) -> float:
    """Locust's run-time notation ('90', '90s', '1m30s', '1h') in seconds."""
    text = str(span).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not text or not match:
        raise LoadTestError(
            f"run time {span!r}: use seconds or Locust's notation, e.g. 60, 60s, 1m30s"
        )
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)
