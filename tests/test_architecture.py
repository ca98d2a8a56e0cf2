"""The layering the code promises: who may import whom, and what each import drags in.

core imports numpy only; training and serving never import each other; the load tests, the
benchmark and the docker helpers use core, never training; the model core and the input
checks import no grpc; importing the server loads neither TensorFlow nor Keras.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.common import ROOT


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """{file: top-level packages it imports}, read from the source (imports inside functions too)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        if "generated" in path.parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("core", {"serving", "training", "loadtest", "bench", "grpc", "tensorflow", "keras", "onnxruntime", "PIL"}),
    ("serving", {"training", "tensorflow", "keras", "loadtest", "bench"}),
    ("training", {"serving", "loadtest", "bench"}),
    ("loadtest", {"training", "tensorflow", "keras"}),
    ("bench", {"training", "tensorflow", "keras"}),
    ("docker", {"training", "serving"}),
    ("serving/inference", {"grpc", "grpc_health", "grpc_reflection"}),
    ("serving/inputs", {"grpc", "grpc_health", "grpc_reflection"}),
])
def test_import_boundaries(folder, forbidden):
    offenders = {path: sorted(names & forbidden) for path, names in imported_packages(ROOT / folder).items()
                 if names & forbidden}
    assert not offenders, f"{folder} must not import {sorted(forbidden)}: {offenders}"


def run_probe(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_importing_the_server_loads_neither_tensorflow_nor_keras():
    result = run_probe(
        "import sys\n"
        "import serving.server, serving.cli, serving.client, serving.predict_cli, serving.health_probe, serving.process\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'training'))\n"
        "assert not loaded, loaded\n"
        "assert 'onnxruntime' in sys.modules and 'grpc' in sys.modules  # the probe did import the server\n"
    )
    assert result.returncode == 0, result.stderr


def test_core_needs_nothing_but_numpy():
    result = run_probe(
        "import sys\n"
        "import core.contract, core.metadata, core.repository, core.idx\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('grpc', 'onnxruntime', 'tensorflow', 'keras', 'PIL', 'google', 'serving', 'training'))\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr


def tensor_name_literals(tree: ast.AST) -> list[str]:
    """String literals used as a tensor's name: `name="images"`, comparisons, and onnxruntime feeds/fetches."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "name":
            candidates = [node.value]
        elif isinstance(node, ast.Compare):
            candidates = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run":
            candidates = [key for arg in node.args if isinstance(arg, ast.Dict) for key in arg.keys]
            candidates += [elt for arg in node.args if isinstance(arg, ast.List) for elt in arg.elts]
        else:
            continue
        found += [c.value for c in candidates if isinstance(c, ast.Constant) and c.value in ("images", "probabilities")]
    return found


def test_the_tensor_contract_is_written_once():
    """The input and output names are spelled out in core/contract.py alone; the others import them."""
    offenders = {}
    for folder in ("serving", "training", "loadtest", "bench", "docker"):
        for path in (ROOT / folder).rglob("*.py"):
            if "generated" not in path.parts and (names := tensor_name_literals(ast.parse(path.read_text()))):
                offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, f"tensor names written outside core/contract.py: {offenders}"
    seen = tensor_name_literals(ast.parse('session.run(["probabilities"], {"images": x}); f(name="images")'))
    assert sorted(seen) == ["images", "images", "probabilities"]  # the check does see such uses
