"""What make bench prints: the side-by-side table of every scenario and server, each figure as a
ratio to the naive server, and issue 19's goals with what bounds each of them on this machine."""

from __future__ import annotations

from bench.common import table
from bench.in_process import best
from bench.serving_scenarios import CANNED, INLINE, NAIVE, SCENARIOS, SERVE, Result, Scenario

# The goals of issue 19, checked on every run.
GOAL_VS_NAIVE = 1.3  # 32 x 1 and 8 x 64, from one connection and from 8
GOAL_8X64_VS_IN_PROCESS = 0.8


COLUMNS = (
    ("scenario", ""),
    ("server", ""),
    ("calls/s", ",.0f"),
    ("images/s", ",.0f"),
    ("p50 ms", ".3f"),
    ("p99 ms", ".3f"),
    ("errors", "d"),
    ("CPU ms/call", ".3f"),
    ("(client)", ".3f"),
    ("vs naive", ""),
)


def _row(r: Result, naive: Result, scenario: Scenario) -> dict[str, object]:
    lone = scenario.callers == 1
    ratio = naive.p50_ms / r.p50_ms if lone else r.images_per_s / naive.images_per_s
    return {
        "scenario": scenario.label,
        "server": r.target,
        "calls/s": r.requests_per_s,
        "images/s": r.images_per_s,
        "p50 ms": r.p50_ms,
        "p99 ms": r.p99_ms,
        "errors": r.errors,
        "CPU ms/call": r.server_cpu_ms_per_call,
        "(client)": r.client_cpu_ms_per_call,
        "vs naive": f"{ratio:.2f}x ({'p50 speed-up' if lone else 'throughput'})",
    }


def report(
    results: list[Result], ceilings: dict[str, dict[str, float]], header: str, order: list[str]
) -> list[str]:
    by = {(r.target, Scenario(r.callers, r.images_per_call, r.connections)): r for r in results}
    lines = [header]
    for model, ceiling in ceilings.items():
        lines.append(
            f"in-process onnxruntime, {model}: "
            + "; ".join(f"{k} {v:,.0f}/s" for k, v in ceiling.items())
        )
    rows = [
        _row(by[(target, s)], by[(NAIVE, s)], s)
        for s in SCENARIOS
        for target in order
        if (target, s) in by
    ]
    lines.append(table(rows, COLUMNS))
    return lines + goals(by, ceilings)


def goals(by: dict, ceilings: dict[str, dict[str, float]]) -> list[str]:
    """The issue's goals for mnist-serve (FP32, its defaults), each with what bounds it here."""
    check = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    best_label, best64 = best(ceilings["fp32"], 64)

    def bound(s: Scenario) -> float:
        """Calls/s of a server that added nothing to the canned server's per-call CPU but the
        model's own: canned's rate scaled by its CPU per call (server + load generator) over that
        plus the model's (in-process, one thread, so CPU time = wall time)."""
        canned = by[(CANNED, s)]
        rpc_ms = canned.server_cpu_ms_per_call + canned.client_cpu_ms_per_call
        model_ms = (
            1000 * s.images / ceilings["fp32"][f"batch {1 if s.images == 1 else 64}, 1 thread"]
        )
        return canned.requests_per_s * rpc_ms / (rpc_ms + model_ms)

    lines = ["goals (mnist-serve, FP32):"]
    for s in SCENARIOS[1:]:
        if (SERVE, s) not in by:  # left out with --scenario
            continue
        serve, naive = by[(SERVE, s)], by[(NAIVE, s)]
        ratio = serve.images_per_s / naive.images_per_s
        lines.append(
            f"  {s.label}: {ratio:.2f}x naive (goal {GOAL_VS_NAIVE}x): "
            f"{check(ratio >= GOAL_VS_NAIVE)}; bound for any server on this gRPC stack "
            f"(canned + the model's CPU per call): {bound(s) * s.images:,.0f} images/s = "
            f"{bound(s) * s.images / naive.images_per_s:.2f}x naive"
        )
        if s.images == 64:
            lines.append(
                f"    {serve.images_per_s / best64:.2f}x in-process at its best ({best_label},"
                f" {best64:,.0f}/s; goal {GOAL_8X64_VS_IN_PROCESS}x): "
                f"{check(serve.images_per_s >= GOAL_8X64_VS_IN_PROCESS * best64)}"
            )
    lone = SCENARIOS[0]
    if (SERVE, lone) in by:
        serve, naive, canned, inline = (by[(t, lone)] for t in (SERVE, NAIVE, CANNED, INLINE))
        lines.append(
            f"  1 x 1 p50: {serve.p50_ms:.3f} ms, naive {naive.p50_ms:.3f} ms (goal: <= naive): "
            f"{check(serve.p50_ms <= naive.p50_ms)}; canned {canned.p50_ms:.3f} ms, the model "
            f"alone {1000 / ceilings['fp32']['batch 1, 1 thread']:.3f} ms (in-process, hot)"
        )
        lines.append(
            f"    {INLINE} (grpc.aio, the model inline, nothing else) {inline.p50_ms:.3f} ms: "
            f"mnist-serve's layers add {serve.p50_ms - inline.p50_ms:+.3f} ms, grpc.aio with the "
            f"model {inline.p50_ms - naive.p50_ms:+.3f} ms over the naive synchronous server"
        )
    errors = sum(r.errors for (target, _), r in by.items() if target == SERVE)
    lines.append(f"  errors: {errors}: {check(errors == 0)}")
    return lines
