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


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        (
            "core",
            {
                "serving",
                "training",
                "loadtest",
                "bench",
                "grpc",
                "tensorflow",
                "keras",
                "onnxruntime",
                "PIL",
            },
        ),
        ("serving", {"training", "tensorflow", "keras", "loadtest", "bench"}),
        ("training", {"serving", "loadtest", "bench"}),
        ("loadtest", {"training", "tensorflow", "keras"}),
        ("bench", {"training", "tensorflow", "keras"}),
        ("docker", {"training", "serving"}),
        ("serving/inference", {"grpc", "grpc_health", "grpc_reflection"}),
        ("serving/inputs", {"grpc", "grpc_health", "grpc_reflection"}),
    ],
)
def test_import_boundaries(folder, forbidden):
    offenders = {
        path: sorted(names & forbidden)
        for path, names in imported_packages(ROOT / folder).items()
        if names & forbidden
    }
    assert not offenders, f"{folder} must not import {sorted(forbidden)}: {offenders}"


def test_transport_free_modules_import_no_transport():
    """Security's files, the error table and the log limiter serve both transports and import neither."""
    found = imported_packages(ROOT / "serving")
    for path in ("serving/security.py", "serving/inference/errors.py", "serving/log_limit.py"):
        assert path in found and not found[path] & {"grpc", "aiohttp"}, (path, found.get(path))


def run_probe(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_importing_the_server_loads_neither_tensorflow_nor_keras():
    result = run_probe(
        "import sys\n"
        "import serving.server, serving.cli, serving.client, serving.predict_cli\n"
        "import serving.health_probe, serving.process\n"
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
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "run"
        ):
            candidates = [key for arg in node.args if isinstance(arg, ast.Dict) for key in arg.keys]
            candidates += [
                elt for arg in node.args if isinstance(arg, ast.List) for elt in arg.elts
            ]
        else:
            continue
        found += [
            c.value
            for c in candidates
            if isinstance(c, ast.Constant) and c.value in ("images", "probabilities")
        ]
    return found


def test_the_tensor_contract_is_written_once():
    """The input and output names are spelled out in core/contract.py alone; the others import them."""
    offenders = {}
    for folder in ("serving", "training", "loadtest", "bench", "docker"):
        for path in (ROOT / folder).rglob("*.py"):
            if "generated" not in path.parts and (
                names := tensor_name_literals(ast.parse(path.read_text()))
            ):
                offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, f"tensor names written outside core/contract.py: {offenders}"
    seen = tensor_name_literals(
        ast.parse('session.run(["probabilities"], {"images": x}); f(name="images")')
    )
    assert sorted(seen) == ["images", "images", "probabilities"]  # the check does see such uses


def domain_errors() -> set[str]:
    """Every ServingError subclass the serving package defines, wherever: `module.QualName`.

    A child interpreter imports every module (the KServe stubs would clash with tritonclient's
    in this process) and walks the hierarchy.
    """
    result = run_probe(
        "import importlib, pkgutil, serving\n"
        "from serving.inference.errors import ServingError\n"
        "for m in pkgutil.walk_packages(serving.__path__, 'serving.'):\n"
        "    if not m.name.startswith('serving.generated'):\n"
        "        importlib.import_module(m.name)\n"
        "found, todo = set(), [ServingError]\n"
        "while todo:\n"
        "    for sub in todo.pop().__subclasses__():\n"
        "        found.add(f'{sub.__module__}.{sub.__qualname__}')\n"
        "        todo.append(sub)\n"
        "print('\\n'.join(sorted(found)))\n"
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_every_domain_error_has_one_row_for_both_transports():
    """One table (errors.STATUS_CODES) gives each domain error its gRPC and its HTTP code."""
    import grpc

    from serving.grpc_api import status as grpc_status
    from serving.http_api import status as http_status
    from serving.inference import errors

    found = domain_errors()
    assert "serving.inference.errors.QueueFull" in found, found  # the walk does see the hierarchy
    rows = {f"{cls.__module__}.{cls.__qualname__}" for cls in errors.STATUS_CODES}
    missing = sorted(found - rows)
    assert not missing, (
        f"domain errors without a row in serving.inference.errors.STATUS_CODES: {missing}"
    )
    assert rows == found, "a row for a class that is no domain error"
    for cls, codes in errors.STATUS_CODES.items():
        error = cls("x")
        assert grpc_status.status_for(error) is grpc.StatusCode[codes.grpc] != grpc.StatusCode.OK
        assert http_status.status_for(error) == codes.http and 400 <= codes.http < 600
    assert grpc_status.status_for(errors.QueueFull("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert http_status.status_for(errors.QueueFull("x")) == 429

    class NewKindOfTrouble(errors.ShuttingDown):
        pass

    class OtherTrouble(errors.ServingError):
        pass

    assert (
        grpc_status.status_for(NewKindOfTrouble("x")) == grpc.StatusCode.UNAVAILABLE
    )  # its base's row
    assert http_status.status_for(NewKindOfTrouble("x")) == 503
    assert (
        grpc_status.status_for(OtherTrouble("x")) == grpc.StatusCode.INTERNAL
    )  # never OK, never hidden
    assert http_status.status_for(OtherTrouble("x")) == 500
