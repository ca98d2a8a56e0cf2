"""What a look at the model repository's folders finds: its models, and a file's stamp.

Both tolerate a repository that changes while being looked at (a folder removed between two
looks is simply not there), since the poller looks while publishers write.
"""

from __future__ import annotations

from pathlib import Path


def list_models(repository: Path) -> list[str]:
    """Model folders in the repository: not hidden, holding a config.pbtxt or a version folder."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(
        p.name for p in repository.iterdir() if not p.name.startswith(".") and _is_model_dir(p)
    )


def _is_model_dir(path: Path) -> bool:
    try:
        return path.is_dir() and (
            (path / "config.pbtxt").is_file()
            or any(c.name.isdigit() for c in path.iterdir() if c.is_dir())
        )
    except OSError:  # removed while being looked at
        return False


def file_stamp(path: Path) -> tuple:
    """(size, mtime, inode) of a file, () when it is not there: a changed file has a new stamp."""
    try:
        stat = path.stat()
    except OSError:
        return ()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)
