"""MkDocs hook: the reference pages, generated from the code at every build so they cannot drift.

- `reference/<command>.md`: every flag of each command-line tool, read from its argparse parser
  (the parser the tool itself runs), grouped as `--help` groups them;
- `reference/metrics.md`: every Prometheus metric defined in `serving/metrics.py`.

Rendering is pure (parser or module in, Markdown out); `on_files` adds the pages to the build.
"""

from __future__ import annotations

import argparse
import html
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Command:
    """One command-line tool: the page it gets and where its parser is built."""

    page: str  # reference/<page>.md
    title: str  # how a user runs it
    module: str
    function: str = "build_parser"
    env_prefix: str = ""  # flags also read from <prefix><DEST> (mnist-serve's MNIST_SERVE_*)


COMMANDS = (
    Command("mnist-serve", "mnist-serve", "serving.flags", env_prefix="MNIST_SERVE_"),
    Command("mnist-train", "mnist-train", "training.cli"),
    Command("mnist-predict", "mnist-predict", "serving.predict_cli"),
    Command("mnist-health-probe", "mnist-health-probe", "serving.health_probe"),
    Command("loadtest", "python -m loadtest.run", "loadtest.run"),
)


def _cell(text: object) -> str:
    """Plain text for a table cell or a paragraph: one line, HTML and pipes escaped."""
    text = " ".join(str(text).split())
    return html.escape(text, quote=False).replace("|", "\\|")


def _code(text: object) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return f"`{text}`" if text else "`''`"


def _help(action: argparse.Action, prog: str) -> str:
    """The help text as `--help` expands it (%(default)s, %(choices)s, %%)."""
    if not action.help or action.help is argparse.SUPPRESS:
        return ""
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    for key, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[key] = value.__name__
    return action.help % params


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(_code(choice) for choice in action.choices)
    if action.metavar:
        return _code(action.metavar)
    kind = getattr(action.type, "__name__", None)
    return {"int": "integer", "float": "number", "Path": "path", "_boolean": "true \\| false"}.get(
        kind, "text"
    )


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if isinstance(action, argparse._StoreFalseAction):
        return "on"
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    if isinstance(action.default, (list, tuple)):
        return ", ".join(_code(item) for item in action.default)
    return _code(action.default)


def parser_markdown(parser: argparse.ArgumentParser, command: Command) -> str:
    """The reference page of one parser: a table per argument group, every flag in it."""
    env = bool(command.env_prefix)
    lines = [
        f"# `{command.title}`",
        "",
        f"Generated from `{command.module}.{command.function}()` when this site is built: the parser "
        f"`{command.title}` itself runs, so this page and `{command.title} --help` cannot disagree.",
        "",
        _cell(parser.description or ""),
        "",
    ]
    if env:
        lines += [
            "Each flag's environment variable is in its row; the command line wins.",
            "",
        ]
    # argparse keeps no public list of its groups; its catch-all "options" group goes last here.
    groups = sorted(
        parser._action_groups, key=lambda group: group.title in ("options", "optional arguments")
    )
    for group in groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = group.title or "options"
        lines += [f"## {title[0].upper()}{title[1:]}", ""]
        if group.description:
            lines += [_cell(group.description), ""]
        header = ["flag", "value", "default"] + (["environment"] if env else []) + ["meaning"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for action in actions:
            flags = ", ".join(_code(s) for s in action.option_strings) or _code(
                action.metavar or action.dest
            )
            row = [flags, _value(action), _default(action)]
            if env:
                row.append(
                    _code(command.env_prefix + action.dest.upper()) if action.option_strings else ""
                )
            row.append(_cell(_help(action, parser.prog)))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


_EXPOSED = {
    "counter": "{}_total",
    "histogram": "{}_bucket, {}_sum, {}_count",
    "gauge": "{}",
    "info": "{}_info",
    "summary": "{}_sum, {}_count",
}


def metrics_markdown(module: ModuleType) -> str:
    """Every metric object defined at the top of `module`, in the order they are defined."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = [value for value in vars(module).values() if isinstance(value, MetricWrapperBase)]
    lines = [
        "# Metrics",
        "",
        f"Generated from the definitions in `{module.__name__}` when this site is built. A server "
        "serves them on `--metrics-port` (default 9100) at `/metrics`; with `--workers N` the parent "
        "process serves them summed over the workers (Prometheus' multiprocess mode). A single-process "
        "server adds Prometheus' process and Python metrics.",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    for metric in metrics:  # prometheus_client keeps name, type and labels in private fields
        names = ", ".join(
            f"`{n}`" for n in _EXPOSED[metric._type].format(*[metric._name] * 3).split(", ")
        )
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        lines.append(f"| {names} | {metric._type} | {labels} | {_cell(metric._documentation)} |")
    lines.append("")
    return "\n".join(lines)


def reference_pages() -> dict[str, str]:
    """reference/<name>.md -> its Markdown, for every command and the metrics."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    pages = {}
    for command in COMMANDS:
        parser = getattr(importlib.import_module(command.module), command.function)()
        pages[f"reference/{command.page}.md"] = parser_markdown(parser, command)
    pages["reference/metrics.md"] = metrics_markdown(importlib.import_module("serving.metrics"))
    return pages


def on_files(files, config):  # MkDocs event: add the generated pages to the build
    from mkdocs.structure.files import File

    for path, content in reference_pages().items():
        files.append(File.generated(config, path, content=content))
    return files
