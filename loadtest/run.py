"""`make loadtest`: a minute of Locust load against mnist-serve, with a summary and reports.

    python -m loadtest.run --model-repository model_repository            # starts a server itself
    python -m loadtest.run --host 127.0.0.1:8500 --users 64 --run-time 2m  # a running server
    python -m loadtest.run --processes 2 --scenario single                 # Locust on two processes

Writes reports/<name>_stats.csv (and Locust's other CSVs), reports/<name>.html and
reports/<name>.log; prints requests/s, p50/p95/p99 and failures as Locust saw them, beside the
server's own view of the same window (its /metrics: calls/s and latency per method, queue wait,
onnxruntime time, images per batch), and the load generator's ceiling: the same users and scenario
against a server with no model, in the same run, with a verdict when Locust, not the server, set
the figures. Exits 1 when any call failed (an RPC error or a wrong prediction), 2 when the test
could not run at all.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from loadtest import run_flags, server_view
from loadtest.ceiling import ceiling_scenario, run_against_canned, verdict
from loadtest.locust_args import LoadTestError, normalize_target, parse_mix_weights, parse_seconds
from loadtest.locust_report import format_stats_table, locust_problem
from loadtest.locust_runner import check_reachable, run_locust

PROG = "loadtest"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run_flags.add_target_flags(parser)
    run_flags.add_load_flags(parser)
    run_flags.add_report_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    if args.spawn_rate <= 0:
        parser.error("--spawn-rate must be above 0")
    if args.images_per_call < 1 or args.pool_size < 1:
        parser.error("--images-per-call and --pool-size must be at least 1")
    if args.processes is not None and (args.processes == 0 or args.processes < -1):
        parser.error("--processes must be a positive count, or -1 for one per CPU")
    try:
        parse_seconds(args.run_time)
        parse_mix_weights(args.mix_weights)
        if args.host:
            args.host = normalize_target(args.host)
    except LoadTestError as error:
        parser.error(str(error))
    return args


def default_processes(cores: int | None = None) -> int | None:
    """One Locust worker process per two cores, the other half left to the server; None (one
    process, no master) below four cores, where a master and workers would only take the
    server's cores."""
    cores = cores or len(os.sched_getaffinity(0))
    return cores // 2 if cores >= 4 else None


def locust_options(args: argparse.Namespace, http_host: str | None) -> dict:
    """What the run against mnist-serve and the one against the canned server share."""
    return dict(
        scenario=args.scenario,
        users=args.users,
        spawn_rate=args.spawn_rate,
        processes=args.processes,
        images_per_call=args.images_per_call,
        mix_weights=args.mix_weights,
        stream=args.verbose,
        extra=[
            "--pool-size",
            str(args.pool_size),
            *(["--http-host", http_host] if http_host else []),
            *(["--model-name", args.model_name] if args.model_name else []),
            *(["--model-version", args.model_version] if args.model_version else []),
        ],
    )


def metrics_url_for(args: argparse.Namespace, server) -> str:
    """Where the server's /metrics are: --metrics-url, the own server's, or port 9100 of --host."""
    if args.metrics_url or server is not None:
        return args.metrics_url or server.metrics_url
    if args.host.startswith(("dns:", "ipv4:", "ipv6:")):
        return ""  # several replicas: no one endpoint sees all the calls
    return f"http://{args.host.rsplit(':', 1)[0]}:9100/metrics"


def measure_ceiling(args: argparse.Namespace, options: dict, reports: Path):
    """The same users and scenario against the canned server; (LocustRun or None, a note)."""
    if parse_seconds(args.ceiling_run_time) <= 0:
        return None, "load generator's ceiling: not measured (--ceiling-run-time 0)"
    scenario = ceiling_scenario(args.scenario, args.mix_weights)
    if scenario is None:
        return None, "load generator's ceiling: not measured (the canned server has no REST)"
    print(
        f"{PROG}: the same load against a server with no model for {args.ceiling_run_time} "
        "(the load generator's ceiling) ...",
        flush=True,
    )
    extra = list(options["extra"])
    if "--http-host" in extra:  # the canned server has no REST port
        del extra[extra.index("--http-host") : extra.index("--http-host") + 2]
    options = {**options, "scenario": scenario[0], "mix_weights": scenario[1], "extra": extra}
    try:
        ceiling = run_against_canned(
            reports / f"{args.name}-ceiling",
            reports / f"{args.name}-ceiling.log",
            run_time=args.ceiling_run_time,
            **options,
        )
    except LoadTestError as error:
        return None, f"load generator's ceiling: not measured ({error})"
    total = ceiling.total
    left_out = " (REST calls left out)" if scenario[1] != args.mix_weights else ""
    return ceiling, (
        f"load generator's ceiling, the same {args.users} users against a server with no "
        f"model{left_out}: {total.requests_per_s:.1f} requests/s, p50 {total.p50_ms:.0f} ms, "
        f"p99 {total.p99_ms:.0f} ms"
    )


def summary(
    run,
    args,
    target: str,
    view: server_view.ServerView | None = None,
    ceiling=None,
    ceiling_note: str = "",
) -> str:
    total = run.total
    lines = [
        f"{args.scenario} load, {args.users} users, {args.run_time} against {target}:",
        f"  Locust (client side): {total.requests_per_s:.1f} requests/s, "
        f"p50 {total.p50_ms:.0f} ms, "
        f"p95 {total.p95_ms:.0f} ms, p99 {total.p99_ms:.0f} ms; {total.failures} failed of "
        f"{total.requests} calls",
        "",
        format_stats_table(run.stats),
    ]
    for name, error, count in run.failures[:5]:
        lines.append(f"  failure x{count} {name}: {error}")
    lines.append("")
    if view is not None and view.calls:
        lines += [
            "the server's own view of the same window (its /metrics; the prediction core's "
            "latency, without Locust's):",
            server_view.format_view(view),
            server_view.latency_share(view, total.p50_ms),
            "",
        ]
    else:
        lines += [
            "the server's own view: not measured (no /metrics could be read; see --metrics-url)",
            "",
        ]
    if ceiling_note:
        lines.append(ceiling_note)
    if ceiling is not None:
        lines.append(verdict(total.requests_per_s, ceiling.total.requests_per_s))
    lines.append("")
    lines.append(
        f"reports: {run.csv_prefix}_stats.csv, {run.html_path}"
        + (f", {run.log_path}" if run.log_path else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.processes is None:
        args.processes = default_processes()
    reports = args.reports_dir
    server = None
    view, ceiling, ceiling_note = None, None, ""
    try:
        reports.mkdir(parents=True, exist_ok=True)
        target, http_host, server = start_target(args, reports)
        options = locust_options(args, http_host)
        run, view = run_load(args, target, options, metrics_url_for(args, server))
        if server is not None:
            server.stop()  # its cores go to the ceiling run
            server = None
        if run.total.requests:
            ceiling, ceiling_note = measure_ceiling(args, options, reports)
    except LoadTestError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
    return report(run, args, target, view, ceiling, ceiling_note)


def start_target(args: argparse.Namespace, reports: Path):
    """(gRPC target, REST host or None, the server started here or None): --host, once it answers
    its health check, else mnist-serve started on --model-repository."""
    if args.host:
        check_reachable(args.host, args.connect_timeout)
        return args.host, args.http_host, None
    server = start_own_server(
        args.model_repository,
        shlex.split(args.server_args),
        reports / f"{args.name}-server.log",
    )
    print(
        f"{PROG}: mnist-serve on {server.target} (model repository {args.model_repository}; "
        f"log {reports / (args.name + '-server.log')})",
        flush=True,
    )
    return server.target, f"127.0.0.1:{server.http_port}", server


def run_load(args: argparse.Namespace, target: str, options: dict, url: str):
    """The Locust run against `target`; (LocustRun, the server's view of its window or None)."""
    print(
        f"{PROG}: {args.scenario} load, {args.users} users for {args.run_time}"
        + (f" on {args.processes} Locust processes" if args.processes else "")
        + " ...",
        flush=True,
    )
    reports = args.reports_dir
    before: server_view.Scrape = {}
    run = run_locust(
        target,
        run_time=args.run_time,
        csv_prefix=reports / args.name,
        html_path=reports / f"{args.name}.html",
        log_path=reports / f"{args.name}.log",
        reset_stats=True,
        on_spawned=lambda: url and before.update(server_view.scrape(url)),
        **options,
    )
    total = run.total
    if url and before and total.requests_per_s > 0:  # the window Locust measured, after spawning
        seconds = total.requests / total.requests_per_s
        return run, server_view.window(before, server_view.scrape(url), seconds)
    return run, None


def report(run, args, target, view, ceiling, ceiling_note) -> int:
    """Print the summary; the exit status: 0, 1 when a call failed, 2 when nothing ran right."""
    total = run.total
    if total.requests:
        print(summary(run, args, target, view, ceiling, ceiling_note))
    else:
        reason = locust_problem(run.log_path)
        print(
            f"{PROG}: error: no call completed (Locust exit status {run.returncode})"
            + (f": {reason}" if reason else "")
            + f"; see {run.log_path or 'its output'}"
            # Counted from when every user runs; each worker process screens its pool first.
            + ("; with --processes, give a longer --run-time" if args.processes else ""),
            file=sys.stderr,
        )
        return 2
    if total.failures:
        print(
            f"{PROG}: FAILED: {total.failures} of {total.requests} calls failed "
            f"({100 * total.failure_ratio:.2f} %)",
            file=sys.stderr,
        )
        return 1
    if run.returncode != 0:  # no failed call, yet Locust saw an error (e.g. an exception in a user)
        reason = locust_problem(run.log_path)
        print(
            f"{PROG}: error: Locust exited with status {run.returncode}"
            + (f": {reason}" if reason else "")
            + f"; see {run.log_path or 'its output'}",
            file=sys.stderr,
        )
        return 2
    return 0


def start_own_server(repository: Path, extra: list[str], log_path: Path):
    """mnist-serve on free loopback ports, or LoadTestError with the reason in one line."""
    from serving.process import start_server

    if not Path(repository).is_dir():
        raise LoadTestError(
            f"model repository {repository} does not exist: train a model first (make train), "
            "pass --model-repository, or point --host at a running server"
        )
    try:
        return start_server(repository, *extra, log_path=log_path, ready_timeout=60.0)
    except (RuntimeError, TimeoutError, OSError) as error:
        last = ""
        if log_path.exists():
            lines = [
                line for line in log_path.read_text(errors="replace").splitlines() if line.strip()
            ]
            last = lines[-1].strip() if lines else ""
        raise LoadTestError(
            f"mnist-serve did not start: {error}"
            + (f"; its last words: {last}" if last else "")
            + f" (log: {log_path})"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
