"""Client strings that name a model or a version: bounded and checked before they become a number
or a folder of the repository.

Both transports hand the registry the caller's strings as they came (gRPC fields, REST path
segments). Python's int() refuses strings of more than 4,300 digits with a ValueError, accepts
other scripts' digits ("²".isdigit() is True, int("²") raises), signs, spaces and underscores;
a model name reaches the file system in explicit model control. So each is checked here first,
by rules a caller can read in the refusal, and a string that breaks them is an unknown version
or model (NOT_FOUND / 404), never an internal error.
"""

from __future__ import annotations

# Triton's versions are int64: at most 9,223,372,036,854,775,807, which has 19 digits.
MAX_VERSION = (1 << 63) - 1
MAX_VERSION_DIGITS = len(str(MAX_VERSION))
VERSION_RULE = f"a model version is a positive integer of at most {MAX_VERSION_DIGITS} digits"

MAX_NAME_BYTES = 255  # a folder name's limit on Linux file systems (ext4, xfs, overlayfs)
NAME_RULE = (
    f"a model name is a folder of the model repository: 1 to {MAX_NAME_BYTES} bytes, "
    "no '/', '\\' or NUL, not starting with '.'"
)


def version_number(text: str) -> int | None:
    """The version `text` names, or None when it cannot name one (see VERSION_RULE).

    Checked before int(): ASCII digits only and at most MAX_VERSION_DIGITS of them, so a 1 MB
    string costs one length test. Leading zeros are accepted ("007" is version 7), as Triton does.
    """
    if not 0 < len(text) <= MAX_VERSION_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if 1 <= number <= MAX_VERSION else None


def is_model_name(name: str) -> bool:
    """Whether `name` can be a model's folder in the repository (see NAME_RULE).

    Dots first: `..` would leave the repository, and `.staging-*` folders are versions being
    published (core.repository), never models.
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\\x00"):
        return False
    return len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
