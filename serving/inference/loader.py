"""Opening one version for serving: the checks a version passes before it takes any traffic.

The same at start and when a poll finds a new version: the files are complete, the sha256
matches metadata.json, onnxruntime opens the file, its input and output are the contract's,
and warm-up runs. Each refusal carries a short `reason` (the failure metric's label) and a
message that says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from core.repository import (
    METADATA_FILENAME,
    MODEL_FILENAME,
    ModelVersion,
    RepositoryError,
    load_version,
)
from serving.inference.runtime import DeviceUnavailable, OnnxRuntimeSession, RuntimeOptions

# The failure metric's reasons, one per check.
# "config": config.pbtxt refused; "deleted": a served version's folder removed with nothing to replace it.
REASONS = (
    "incomplete",
    "metadata",
    "checksum",
    "invalid_onnx",
    "signature",
    "warmup",
    "device",
    "config",
    "deleted",
)


class LoadFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class OpenedVersion:
    version: ModelVersion
    runtime: OnnxRuntimeSession
    sha256: str


def fingerprint(directory: Path) -> tuple:
    """What changes when a version's files change: names, sizes, modification times, inodes.

    () when the folder is gone. The inode catches a file renamed over another of the same size
    whose modification time was kept (cp -p, rsync -t).
    """
    try:
        stats = [(p.name, p.stat()) for p in directory.iterdir()]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


def open_version(
    repository: Path, name: str, number: int, options: RuntimeOptions
) -> OpenedVersion:
    """Check and open <repository>/<name>/<number>, warmed up; LoadFailure says why not. Blocking."""
    directory = Path(repository) / name / str(number)
    try:
        return _open_version(Path(repository), name, number, directory, options)
    except OSError as err:  # a file removed or replaced between two steps of the checks
        raise LoadFailure(
            "incomplete",
            f"{directory}: {err.strerror or err} while checking it "
            "(removed or still being written?)",
        ) from err


def _open_version(
    repository: Path, name: str, number: int, directory: Path, options: RuntimeOptions
) -> OpenedVersion:
    if not (directory / MODEL_FILENAME).is_file():
        raise LoadFailure(
            "incomplete", f"{directory}: no {MODEL_FILENAME} (a folder still being written?)"
        )
    if not (directory / METADATA_FILENAME).exists() and _siblings_have_metadata(directory):
        # Published versions of this model carry metadata.json: one without it is still being copied.
        raise LoadFailure(
            "incomplete",
            f"{directory}: no {METADATA_FILENAME} beside {MODEL_FILENAME} "
            "(a folder still being written?)",
        )
    try:
        version = load_version(repository, name, number)
    except RepositoryError as err:
        raise LoadFailure("metadata", str(err)) from err
    try:
        sha = version.verify_checksum()
    except RepositoryError as err:
        raise LoadFailure("checksum", str(err)) from err
    try:
        runtime = OnnxRuntimeSession(str(version.model_path), options)
    except DeviceUnavailable as err:
        raise LoadFailure("device", str(err)) from err
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exceptions (InvalidProtobuf, Fail...)
        if not version.model_path.is_file():
            raise LoadFailure(
                "incomplete", f"{version.model_path} was removed while being checked"
            ) from err
        raise LoadFailure(
            "invalid_onnx",
            f"{version.model_path}: onnxruntime cannot open it "
            f"({_first_line(err)}); republish the version",
        ) from err
    problem = signature_problem(runtime, len(version.class_names))
    if problem:
        raise LoadFailure(
            "signature",
            f"{version.model_path}: {problem}; the server's contract is "
            f"{INPUT_NAME} float32 [N, {', '.join(map(str, IMAGE_SHAPE))}] -> "
            f"{OUTPUT_NAME} float32 [N, classes]",
        )
    try:
        runtime.warm_up()
    except Exception as err:  # noqa: BLE001 - a model that opens but cannot run
        raise LoadFailure(
            "warmup", f"{version.model_path}: warm-up failed ({_first_line(err)})"
        ) from err
    return OpenedVersion(version, runtime, sha)


def signature_problem(runtime: OnnxRuntimeSession, num_classes: int) -> str | None:
    """What differs between the graph's input/output and the contract (core.contract), or None."""
    inputs, outputs = runtime.session.get_inputs(), runtime.session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        return f"the graph's inputs are {[i.name for i in inputs]}, not ['{INPUT_NAME}']"
    if inputs[0].type != "tensor(float)" or list(inputs[0].shape[1:]) != list(IMAGE_SHAPE):
        return f"input '{INPUT_NAME}' is {inputs[0].type} {inputs[0].shape}"
    by_name = {o.name: o for o in outputs}
    if OUTPUT_NAME not in by_name:
        return f"the graph's outputs are {sorted(by_name)}, without '{OUTPUT_NAME}'"
    output = by_name[OUTPUT_NAME]
    if output.type != "tensor(float)" or len(output.shape) != 2 or output.shape[1] != num_classes:
        return (
            f"output '{OUTPUT_NAME}' is {output.type} {output.shape}, "
            f"not [N, {num_classes}] for {num_classes} classes"
        )
    return None


def _siblings_have_metadata(directory: Path) -> bool:
    return any(
        (sibling / METADATA_FILENAME).is_file()
        for sibling in directory.parent.iterdir()
        if sibling != directory and sibling.name.isdigit()
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
