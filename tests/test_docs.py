"""The documentation: the site builds strictly, its generated reference holds every flag and metric,
the architecture page's module table matches the files, and the README stays a front door."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.common import ROOT

# Where hand-written Python lives (tests aside); generated stubs are not hand-written.
SOURCE_FOLDERS = (
    "core",
    "training",
    "serving",
    "loadtest",
    "bench",
    "docker",
    "deploy",
    "proto",
    "docs/hooks",
)
GENERATED = ("serving/generated/",)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`mkdocs build --strict`, as `make docs` runs it: a broken link or anchor, a page missing from
    the nav or a nav entry without a page fails the build."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def reference_hook():
    spec = importlib.util.spec_from_file_location(
        "docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def code_spans(html: str) -> set[str]:
    return set(re.findall(r"<code>([^<]+)</code>", html))


def test_the_site_builds_strictly_with_every_page(site):
    pages = {
        path.relative_to(ROOT / "docs").with_suffix("").as_posix()
        for path in (ROOT / "docs").rglob("*.md")
    }
    for page in pages | {"reference/metrics"}:
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.exists(), f"docs/{page}.md was not built"


def test_every_command_has_a_generated_reference_with_every_flag(site):
    hook = reference_hook()
    scripts = {
        entry.name
        for entry in importlib.metadata.distribution("mnist-cnn-serving").entry_points
        if entry.group == "console_scripts"
    }
    pages = {command.page for command in hook.COMMANDS}
    assert set(scripts) <= pages, f"commands without a reference page: {set(scripts) - pages}"
    assert "loadtest" in pages
    for command in hook.COMMANDS:
        parser = getattr(importlib.import_module(command.module), command.function)()
        page = (site / "reference" / command.page / "index.html").read_text()
        spans = code_spans(page)
        flags = [
            flag
            for action in parser._actions
            for flag in action.option_strings
            if flag not in ("-h", "--help")
        ]
        assert flags, command
        missing = [flag for flag in flags if flag not in spans]
        assert not missing, (
            f"{command.title}: flags missing from reference/{command.page}.md: {missing}"
        )
        if command.env_prefix:  # mnist-serve: each flag's environment variable beside it
            envs = [
                command.env_prefix + action.dest.upper()
                for action in parser._actions
                if action.option_strings and action.dest != "help"
            ]
            assert not [env for env in envs if env not in spans]


def test_every_metric_the_server_registers_is_in_the_generated_reference(site):
    # The whole server is imported, so that a metric defined outside serving/metrics.py is found
    # too; in a process of its own, since tritonclient's protobuf symbols are loaded in this one.
    probe = (
        "import serving.server, serving.supervisor\n"
        "from prometheus_client import REGISTRY\n"
        "print('\\n'.join(name for name in REGISTRY._names_to_collectors if name.startswith('mnist_')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(result.stdout.split())
    assert "mnist_requests_total" in names
    spans = code_spans((site / "reference" / "metrics" / "index.html").read_text())
    # The registry also holds each family's base name (mnist_requests for mnist_requests_total,
    # mnist_batch_size for its _bucket/_sum/_count): covered by the exposed names that extend it.
    missing = sorted(
        name
        for name in names
        if not name.endswith("_created")
        and name not in spans
        and not any(span.startswith(name + "_") for span in spans)
    )
    assert not missing, (
        f"metrics missing from the reference (define them in serving/metrics.py): {missing}"
    )


def module_table(markdown: str) -> list[str]:
    """The paths named in the first cell of each row of the page's `| module | its one job |` table;
    a bare name (`kserve.py`) is in the folder of the path before it in the same cell."""
    lines = markdown.splitlines()
    start = lines.index("| module | its one job |")
    named = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        folder = ""
        for token in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            path = f"{folder}/{token}" if folder and "/" not in token.rstrip("/") else token
            named.append(path)
            folder = path.rstrip("/") if path.endswith("/") else path.rpartition("/")[0]
    return named


def hand_written_modules() -> set[str]:
    found = set()
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if (
                path.name != "__init__.py"
                and not relative.startswith(GENERATED)
                and "__pycache__" not in relative
            ):
                found.add(relative)
    return found


def test_the_module_table_names_every_module_and_only_modules_that_exist():
    named = module_table((ROOT / "docs" / "architecture.md").read_text())
    assert len(named) > 40
    absent = [path for path in named if not (ROOT / path).exists()]
    assert not absent, f"docs/architecture.md names modules that do not exist: {absent}"
    unlisted = sorted(hand_written_modules() - set(named))
    assert not unlisted, f"modules missing from docs/architecture.md's module table: {unlisted}"


def test_the_module_table_reader_resolves_bare_names_and_folders():
    table = (
        "| module | its one job |\n|---|---|\n| `serving/grpc_api/classifier.py`, `kserve.py` | x |\n"
        "| `proto/`, `proto/generate.py` | y |\n| `serving/http_api/page.py`, `static/` | z |\n\nafter\n"
    )
    assert module_table(table) == [
        "serving/grpc_api/classifier.py",
        "serving/grpc_api/kserve.py",
        "proto/",
        "proto/generate.py",
        "serving/http_api/page.py",
        "serving/http_api/static/",
    ]


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, "README.md is the front door: reference goes into docs/"
    assert "make demo" in readme and "make test" in readme
    targets = [
        target.split("#")[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", readme)
        if not target.startswith(("http://", "https://", "#", "mailto:"))
    ]
    assert targets
    broken = [target for target in targets if not (ROOT / target).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
