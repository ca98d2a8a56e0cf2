"""A clean checkout of HEAD: what the image tests build from, so uncommitted edits never enter it."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def clean_checkout(dest: Path) -> None:
    """HEAD's committed files only (`git archive`): what a fresh clone holds."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"],
        capture_output=True,
        check=False,
    )
    assert archive.returncode == 0, (
        f"git archive HEAD: {archive.stderr.decode()[-500:]} (the tests build HEAD)"
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
