"""Which versions of a model serve: Triton's version_policy, as a pure function of the versions on disk.

    latest { num_versions: N }   the N highest version numbers (Triton's default, N = 1)
    all { }                      every version
    specific { versions: [...] } exactly those listed (the ones present)

One difference from Triton, on purpose: the policy is applied to the versions that *can* load.
A newest version that fails its checks is left out and the policy picks again from the rest, so
`latest {1}` keeps serving the previous version instead of leaving the model unavailable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1  # for latest
    versions: tuple[int, ...] = ()  # for specific

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(f"version_policy must be latest, all or specific, not '{self.kind}'")
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError("version_policy latest { num_versions } must be at least 1")

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions to serve out of `available` (those on disk that can load)."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return set(ordered)
        if self.kind == "specific":
            return set(ordered) & set(self.versions)
        return set(ordered[-self.num_versions :])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == "specific":
            return f"specific {{ versions: {list(self.versions)} }}"
        return "all { }"
