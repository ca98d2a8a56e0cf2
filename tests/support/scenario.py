"""A scenario run once, step by step, recording what each step saw: the system tests' shape.

A module fixture runs the steps in order; each test checks one promise against the record, so the
tests pass or fail alone and in any order (pytest-randomly shuffles them), and a step that could
not finish fails only the tests that read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Scenario:
    """Mixed into a dataclass that has `seen: dict[str, object]` and `errors: dict[str, str]`."""

    seen: dict[str, object]
    errors: dict[str, str]

    def step(self, name: str, action: Callable) -> None:
        """Run one step of the scenario, recording what it saw; a failure is kept for its test."""
        try:
            action(self)
        except Exception as error:  # noqa: BLE001  (reported by the test that checks this step)
            self.errors[name] = f"{type(error).__name__}: {error}"

    def run_steps(self, steps: Iterable[tuple[str, Callable]]) -> None:
        for name, action in steps:
            self.step(name, action)

    def check(self, *steps: str) -> None:
        failed = {step: self.errors[step] for step in steps if step in self.errors}
        assert not failed, "\n".join(f"{step}: {error}" for step, error in failed.items())


def figures_line(title: str, figures: dict[str, str]) -> str:
    return f"\n{title}: " + ", ".join(f"{key}={value}" for key, value in figures.items())
