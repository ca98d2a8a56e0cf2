"""Shared by the training tests: a copy of a dataset's folder and Fashion-MNIST's folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.idx import find_data_dir
from tests.support.common import ROOT


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        shutil.copy(path, dst / path.name)
    return dst


def fashion_mnist_dir() -> Path | None:
    """Fashion-MNIST's folder ($FASHION_MNIST_DATA_DIR, the shared copy, or Debian's package)."""
    shared = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
    if not os.environ.get("FASHION_MNIST_DATA_DIR") and shared.is_dir():
        return shared
    return find_data_dir("fashion-mnist")
