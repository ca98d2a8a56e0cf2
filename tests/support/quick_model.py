"""The serving tests' one small model: trained by mnist-train once, then reused while nothing that
made it has changed.

Training it (TensorFlow's import, two epochs on 6,000 images, the tf2onnx export, parity and the
INT8 calibration) took 80 of `make test-fast`'s 164 s. The result is a pure function of the
training code, the data and the libraries, so it is kept under
`$XDG_CACHE_HOME/mnist-cnn-serving/quick-model/<key>`, the key a hash of all three: a change to
training/ or core/, another TensorFlow or another MNIST file trains again. Set
MNIST_TEST_MODEL_CACHE=0 to train every session (CI's clean machine has no cache anyway, and
the tests/test_training_*.py modules train their own models whatever this holds).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from tests.support.common import QUICK_TRAIN_ARGS, ROOT, mnist_dir, run_train

# What the training's result depends on, beside its own code and the data.
LIBRARIES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy")


def cache_key() -> str:
    digest = hashlib.sha256(repr(QUICK_TRAIN_ARGS).encode())
    for package in ("training", "core"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent".encode())
    for path in sorted(mnist_dir().glob("*-ubyte*")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path | None:
    if os.environ.get("MNIST_TEST_MODEL_CACHE", "1") == "0":
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mnist-cnn-serving" / "quick-model" / cache_key()


# mnist-train's summary names the files it wrote; in the cache their folder is this placeholder.
TRAINED_IN = "{quick-model}"


def quick_model(root: Path) -> Path:
    """root/model_repository, root/artifacts and root/summary.txt (mnist-train's summary)."""
    cached = cache_dir()
    if cached is None or not (cached / "summary.txt").exists():
        built = _train(Path(tempfile.mkdtemp(prefix="quick-model-", dir=root)))
        _name_folder(built, str(built), TRAINED_IN)
        if cached is None:
            _place(built, root)
            return _name_folder(root, TRAINED_IN, str(root))
        _publish(built, cached)
    shutil.copytree(cached, root, dirs_exist_ok=True)
    return _name_folder(root, TRAINED_IN, str(root))


def _name_folder(root: Path, old: str, new: str) -> Path:
    """The summary's paths under `old` rewritten under `new`, as if trained in place."""
    summary = root / "summary.txt"
    summary.write_text(summary.read_text().replace(old, new))
    return root / "model_repository"


def _train(into: Path) -> Path:
    result = run_train(
        *QUICK_TRAIN_ARGS,
        "--out",
        str(into / "model_repository"),
        "--artifacts",
        str(into / "artifacts"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (into / "summary.txt").write_text(result.stdout)  # read by the INT8 tests
    return into


def _place(built: Path, root: Path) -> None:
    for item in built.iterdir():
        shutil.move(str(item), root / item.name)
    shutil.rmtree(built)


def _publish(built: Path, cached: Path) -> None:
    """Into the cache in one rename, so a session killed halfway leaves no half model there."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    shutil.copytree(built, staging, dirs_exist_ok=True)
    shutil.rmtree(built)
    try:
        staging.rename(cached)
    except OSError:  # another session published it first: same inputs, same model
        shutil.rmtree(staging, ignore_errors=True)
