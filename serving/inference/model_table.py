"""The lookup table every API serves from: model name -> version -> ServedModel.

Lookups (`resolve`, `is_ready`, ...) are plain functions on the event loop: a call looks its
version up and queues its images on that version's batcher without an await in between, so a
call that was accepted always finishes on the version that accepted it. The table is replaced
as a whole (`_publish`, one assignment), never edited in place, so a lookup sees the versions
before a change or after it, never half of one. What keeps it in line with the repository is
serving.inference.registry.
"""

from __future__ import annotations

from serving.inference.errors import ServingError, UnknownModel, UnknownVersion, quoted
from serving.inference.model_config import ModelConfig
from serving.inference.names import VERSION_RULE, version_number
from serving.inference.served_model import ANSWERING, ServedModel

DEFAULT_MODEL = "mnist"  # what an empty model name means when the server serves it


class ModelTable:
    """Every ready version of every model, and each model's config.pbtxt, by name."""

    def __init__(self, preferred_names: tuple[str, ...], max_batch_size: int) -> None:
        self._preferred = preferred_names  # --model-name: the first is the default model
        self._max_batch_size = max_batch_size
        # name -> version -> ServedModel. Replaced as a whole on every change, never edited in place.
        self._served: dict[str, dict[int, ServedModel]] = {}
        self._configs: dict[str, ModelConfig] = {}

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def model_names(self) -> list[str]:
        """The models with at least one ready version."""
        return sorted(name for name, versions in self._served.items() if versions)

    def default_name(self) -> str:
        """What an empty model name means: the first --model-name, else `mnist`, else the first served."""
        for name in (*self._preferred, DEFAULT_MODEL):
            if self._served.get(name):
                return name
        names = self.model_names()
        return names[0] if names else (self._preferred or (DEFAULT_MODEL,))[0]

    def resolve(self, name: str, version: str) -> ServedModel:
        """The ready version a call means: `version` empty = the newest ready one.

        UnknownModel or UnknownVersion otherwise.
        """
        name = name or self.default_name()
        versions = self._served.get(name)
        if not versions:
            served = ", ".join(f"'{n}'" for n in self.model_names()) or "no model"
            raise UnknownModel(f"unknown model '{name}'; this server serves {served}")
        if version == "":
            model = versions[max(versions)]
        else:
            number = version_number(
                version
            )  # bounded and checked before int(): serving.inference.names
            model = versions.get(number) if number is not None else None
        if model is None:
            rule = "" if number is not None else f" ({VERSION_RULE})"
            raise UnknownVersion(
                f"model '{name}' version {quoted(version)} is not served{rule}; ready versions: "
                f"{', '.join(map(str, sorted(versions)))} (leave the version empty for the newest)"
            )
        ANSWERING.set(model.answering)  # the call's metrics name this version
        return model

    def is_ready(self, name: str, version: str) -> bool:
        try:
            self.resolve(name, version)
        except ServingError:
            return False
        return True

    def ready_versions(self, name: str) -> list[int]:
        return sorted(self._served.get(name or self.default_name(), {}))

    def served(self) -> list[ServedModel]:
        """Every ready version of every model, by name then version."""
        return [
            self._served[name][v]
            for name in sorted(self._served)
            for v in sorted(self._served[name])
        ]

    def config(self, name: str) -> ModelConfig:
        """The model's config.pbtxt as Triton's ModelConfig (of a model with a ready version)."""
        self.resolve(name, "")
        return self._configs[name or self.default_name()]

    def statistics(self, name: str, version: str) -> list[ServedModel]:
        """The versions ModelStatistics reports on: empty name = every model, empty version = every version."""
        if not name:
            return self.served()
        if not version:
            self.resolve(name, "")
            return [self._served[name][v] for v in sorted(self._served[name])]
        return [self.resolve(name, version)]

    def _publish(self, name: str, versions: dict[int, ServedModel]) -> None:
        """Serve `versions` of `name` from now on (none: the model goes), in one assignment."""
        served = dict(self._served)
        if versions:
            served[name] = versions
        else:
            served.pop(name, None)
        self._served = served
