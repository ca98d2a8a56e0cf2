"""docker-compose.yml as Compose reads it, and the Dockerfiles' stages: what the compose, container
and monitoring tests read the project's container files with."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.common import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $VAR and $$."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"] or ""
        value = variables.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"{name}: {arg or 'required'}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node, variables):
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def load_compose(variables: dict[str, str]) -> dict:
    """docker-compose.yml with YAML anchors resolved and the given variables (and no others) interpolated."""
    return _interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), variables)


def volumes_of(service: dict) -> list[tuple[str, str]]:
    """(source, container path) of each volume; source is a path for bind mounts, else a volume name."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), volume["target"]))
        else:
            source, target = (volume.split(":") + [""])[:2]
            mounts.append((source, target))
    return mounts


def compose_order(compose: dict) -> list[str]:
    """Services in an order that respects depends_on (what `docker compose up` starts first)."""
    services, order = compose["services"], []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join(path + (name,))}"
        if name not in order:
            for dependency in services[name].get("depends_on") or {}:
                visit(dependency, path + (name,))
            order.append(name)

    for name in services:
        visit(name)
    return order


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        message = (
            "the docker-compose binary is not installed (Debian: apt-get install docker-compose)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must install it to validate docker-compose.yml")
        pytest.skip(message)
    return exe


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages); continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(
                r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE
            )
            stages.append(Stage(match[2] or str(len(stages)), match[1], []))
        elif instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def stage_closure(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and every stage it builds on or copies from."""
    by_name = {stage.name: stage for stage in stages}
    seen: list[Stage] = []

    def visit(name: str) -> None:
        stage = by_name[name]
        if stage in seen:
            return
        seen.append(stage)
        if stage.base in by_name:
            visit(stage.base)
        for copy in stage.all("COPY"):
            source = re.search(r"--from=(\S+)", copy)
            if source and source[1] in by_name:
                visit(source[1])

    visit(target)
    return seen
