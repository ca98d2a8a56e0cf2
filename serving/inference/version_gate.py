"""The gate a version passes from the repository into service, and what it remembers of each.

A version is opened in a worker thread after the checks of serving.inference.loader, while the
served ones keep answering, then started with its own batcher and statistics. A version that
fails its checks is refused: one log line, the failure metric, and it is not tried again until
its files change. A served version whose files change is checked again: a change that fails is
refused and the loaded copy keeps serving; one with another sha256 is loaded to replace it; one
with the same sha256 is only noted. A served version whose folder is deleted keeps serving from
memory while no other version can (reason "deleted"). A config.pbtxt that cannot be read is
refused once per change of the file.

The registry (serving.inference.registry) decides which versions to ask for and when to switch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serving.inference import activity
from serving.inference.batcher import DynamicBatcher
from serving.inference.loader import LoadFailure, OpenedVersion, fingerprint, open_version
from serving.inference.observers import LifecycleObserver, VersionObserver, timed_infer
from serving.inference.repository_scan import file_stamp
from serving.inference.runtime import CPU
from serving.inference.served_model import ServedModel
from serving.inference.stats import InferenceStats

if TYPE_CHECKING:
    from serving.inference.registry import RegistryOptions

log = logging.getLogger("mnist-serve")


@dataclass(frozen=True)
class Refusal:
    fingerprint: tuple
    reason: str
    message: str


class VersionGate:
    """Opens, starts and refuses versions; remembers refusals and what each served version is."""

    def __init__(
        self,
        options: RegistryOptions,
        observer: LifecycleObserver,
        serving_versions: Callable[[str], list[int]],
    ) -> None:
        self.options = options
        self._observer = observer
        self._serving_versions = serving_versions  # the versions of a model that answer now
        self._refused: dict[tuple[str, int], Refusal] = {}
        # (name, version) -> (files' fingerprint, sha256) of each served version when checked.
        self._loaded: dict[tuple[str, int], tuple[tuple, str]] = {}
        self._config_refused: dict[str, tuple[tuple, str]] = {}  # name -> (fingerprint, message)
        self._orphans: set[tuple[str, int]] = set()  # served versions whose folder is gone

    @property
    def repository(self) -> Path:
        return Path(self.options.repository)

    # ---- what is remembered ----

    def refused_versions(self, name: str) -> dict[int, Refusal]:
        return {v: r for (n, v), r in self._refused.items() if n == name}

    def why_refused(self, name: str) -> str | None:
        """Why the model's config or its newest refused version was refused; None: neither was."""
        if name in self._config_refused:
            return self._config_refused[name][1]
        refusals = [r for (n, _v), r in sorted(self._refused.items(), reverse=True) if n == name]
        return refusals[0].message if refusals else None

    def still_refused(self, name: str, number: int) -> bool:
        """A refused version is tried again only once its files have changed."""
        refusal = self._refused.get((name, number))
        return refusal is not None and refusal.fingerprint == fingerprint(
            self.repository / name / str(number)
        )

    def forget(self, name: str, number: int) -> None:
        """The version was unloaded: a copy of it loaded later is news."""
        self._loaded.pop((name, number), None)

    # ---- config.pbtxt ----

    def refuse_config(self, name: str, model_dir: Path, message: str) -> None:
        # The file's own stamp: a new version is no new refusal.
        stamp = file_stamp(model_dir / "config.pbtxt")
        if name not in self._config_refused or self._config_refused[name][0] != stamp:
            self._config_refused[name] = (stamp, message)  # once per change
            self._observer.load_failed(name, "config")
            log.warning(
                "model '%s' config refused: %s; the last good one stays in force", name, message
            )

    def config_accepted(self, name: str) -> None:
        self._config_refused.pop(name, None)

    # ---- versions ----

    async def load(self, name: str, number: int) -> ServedModel:
        """Check and open a version, batcher started; LoadFailure (refused, logged, counted)."""
        # Before reading: a later change is news.
        stamp = fingerprint(self.repository / name / str(number))
        opened = await self._open(name, number, stamp)
        return self._serve(name, number, opened, stamp)

    async def recheck_changed(
        self, name: str, current: dict[int, ServedModel]
    ) -> tuple[dict[int, ServedModel], list[ServedModel]]:
        """Check again each served version whose files changed; swap in those whose model changed.

        Returns the versions to go on with and the ServedModels they replace. A change that fails
        is refused (the loaded copy keeps serving); one with the same sha256 is only noted.
        """
        result, replaced = dict(current), []
        for number, model in sorted(current.items()):
            stamp = fingerprint(self.repository / name / str(number))
            known = self._loaded.get((name, number))
            if not stamp or known is None or stamp == known[0] or self.still_refused(name, number):
                continue  # deleted (see keep_orphans), unchanged, or a change already refused
            try:
                opened = await self._open(name, number, stamp)
            except LoadFailure:
                continue
            self._refused.pop((name, number), None)
            if opened.sha256 == known[1]:
                self._loaded[(name, number)] = (stamp, opened.sha256)
                log.info(
                    "model '%s' version %d: its files changed but its model did not (sha256 %s…); "
                    "it keeps serving",
                    name,
                    number,
                    opened.sha256[:12],
                )
                del opened
                continue
            result[number] = self._serve(name, number, opened, stamp)
            replaced.append(model)
            log.info(
                "model '%s' version %d changed on disk: the new model (sha256 %s…) replaces the "
                "loaded one (%s…) after its accepted calls finish",
                name,
                number,
                opened.sha256[:12],
                known[1][:12],
            )
        return result, replaced

    def keep_orphans(
        self,
        name: str,
        current: dict[int, ServedModel],
        served: dict[int, ServedModel],
        on_disk: list[int],
    ) -> dict[int, ServedModel]:
        """When every served version's folder is gone and nothing replaces them, keep them."""
        gone = {v: m for v, m in current.items() if v not in on_disk}
        if served or not gone:
            if served:
                self._orphans -= {(name, v) for v in current}
            return served
        for number in sorted(gone):
            if (name, number) not in self._orphans:
                self._orphans.add((name, number))
                self._observer.load_failed(name, "deleted")
                log.warning(
                    "model '%s' version %d: its folder was deleted but no other version can serve; "
                    "it keeps serving from memory until a valid version is published",
                    name,
                    number,
                )
        return gone

    async def _open(self, name: str, number: int, stamp: tuple) -> OpenedVersion:
        started = time.monotonic()
        try:
            opened: OpenedVersion = await asyncio.get_running_loop().run_in_executor(
                None, open_version, self.repository, name, number, self.options.runtime
            )
        except LoadFailure as failure:
            self._refuse(name, number, failure, stamp)
            raise
        log.info(
            "model '%s' version %d passed its checks (sha256 %s…, %s) in %.2f s",
            name,
            number,
            opened.sha256[:12],
            opened.runtime.provider,
            time.monotonic() - started,
        )
        return opened

    def _serve(self, name: str, number: int, opened: OpenedVersion, stamp: tuple) -> ServedModel:
        options = self.options
        stats = InferenceStats()
        batches = self._observer.batch_observer(name, number, options.max_queue_size)
        observer = VersionObserver(stats, batches)
        batcher = DynamicBatcher(
            timed_infer(opened.runtime.run, observer, stats),
            options.max_batch_size,
            options.max_queue_delay,
            options.max_queue_size,
            observer,
            run_lone_inline=opened.runtime.provider == CPU,
            # On the CPU, batches may use the cores the other --workers leave idle.
            parallel=activity.batch_slots if opened.runtime.provider == CPU else None,
        )
        batcher.start()
        self._refused.pop((name, number), None)
        self._loaded[(name, number)] = (stamp, opened.sha256)
        self._observer.version_loaded(name, number, opened.runtime.provider)
        return ServedModel(
            opened.version, opened.runtime.provider, options.max_batch_size, batcher, stats
        )

    def _refuse(self, name: str, number: int, failure: LoadFailure, stamp: tuple) -> None:
        self._refused[(name, number)] = Refusal(stamp, failure.reason, failure.message)
        self._observer.load_failed(name, failure.reason)
        serving = self._serving_versions(name)
        if number in serving:
            known = self._loaded.get((name, number), ((), ""))[1]
            after = (
                f"version {number} keeps serving the copy it loaded before the change "
                f"(sha256 {known[:12]}…)"
            )
        else:
            after = (
                f"still serving versions {serving}" if serving else "no version of it is serving"
            )
        log.warning(
            "model '%s' version %d refused (%s): %s; %s",
            name,
            number,
            failure.reason,
            failure.message,
            after,
        )
