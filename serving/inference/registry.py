"""The model registry: every served model, each with its ready versions, each version with its own batcher.

    models -> versions -> ServedModel (onnxruntime session + DynamicBatcher + statistics)

The lookups (`resolve`, `is_ready`, ...) are the table's (serving.inference.model_table); this
module keeps that table in line with the repository.

`sync()` brings the served versions in line with the repository and each model's
version_policy (serving.inference.version_policy): a version passes the checks of
serving.inference.loader in a worker thread while the old ones keep serving, then the new set
of versions replaces the old in one assignment. Versions that leave the set are retired: no new
call reaches them, and after `retire_delay` (for calls that looked them up and have not queued
yet, e.g. while reading an HTTP body) their batcher finishes what is queued and closes.

A version that fails its checks is refused: one log line, the failure metric, and it is not
tried again until its files change (then at the next sync). The repository changing under a
served version never costs a call, because its onnxruntime session holds the model in memory:

- a served version's files change (model.onnx rewritten or truncated, metadata.json edited): the
  version is checked again; a change that fails is refused and the loaded copy keeps serving; a
  change that passes with another sha256 is loaded and swapped in like a new version;
- a served version's folder is deleted: it is retired as Triton does, and calls move to the
  versions the policy picks from what remains; when nothing else can serve, the loaded copy keeps
  serving (one line, reason "deleted") until a valid version appears: unloading would turn every
  call into an error while the model is still in memory;
- config.pbtxt cannot be read: the last good one stays in force.

Model control (Triton's modes):
`none` syncs once at start, `poll` syncs every --repository-poll-secs (serving.inference.poller),
`explicit` syncs the models that load()/unload() name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from core.repository import RepositoryError, list_versions, no_versions_message
from serving.inference.batcher import BatchObserver, DynamicBatcher
from serving.inference.errors import (
    ModelControlDisabled,
    ModelLoadFailed,
    UnknownModel,
    quoted,
)
from serving.inference.loader import LoadFailure, OpenedVersion, fingerprint, open_version
from serving.inference.model_config import (
    ConfigError,
    ModelConfig,
    read_model_config,
    version_policy,
)
from serving.inference.model_table import ModelTable
from serving.inference.names import NAME_RULE, is_model_name
from serving.inference.runtime import CPU, RuntimeOptions
from serving.inference.served_model import ServedModel
from serving.inference.stats import InferenceStats
from serving.inference.version_policy import VersionPolicy
from serving.memory import release_memory

log = logging.getLogger("mnist-serve")

CONTROL_MODES = ("none", "poll", "explicit")


class LifecycleObserver(Protocol):
    """Where the registry reports loads, unloads and refusals (the server plugs Prometheus in)."""

    def batch_observer(self, name: str, version: int, queue_capacity: int) -> BatchObserver: ...
    def version_loaded(self, name: str, version: int, provider: str) -> None: ...
    def version_unloaded(self, name: str, version: int, provider: str) -> None: ...
    def load_failed(self, name: str, reason: str) -> None: ...


class _NoLifecycleObserver:
    def batch_observer(self, name: str, version: int, queue_capacity: int) -> BatchObserver | None:
        return None

    def version_loaded(self, name: str, version: int, provider: str) -> None: ...
    def version_unloaded(self, name: str, version: int, provider: str) -> None: ...
    def load_failed(self, name: str, reason: str) -> None: ...


@dataclass(frozen=True)
class RegistryOptions:
    repository: Path
    model_names: tuple[
        str, ...
    ] = ()  # () : every model in the repository (explicit mode: none at start)
    pinned_version: int | None = None  # --model-version: serve exactly this version of each model
    control_mode: str = "poll"
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    max_batch_size: int = 64
    max_queue_delay: float = 0.0
    max_queue_size: int = 1024
    retire_delay: float = 1.0  # seconds a retired version still accepts calls that looked it up


@dataclass(frozen=True)
class IndexEntry:
    """One line of Triton's RepositoryIndex."""

    name: str
    version: str
    state: str  # READY | UNAVAILABLE | "" (never loaded)
    reason: str = ""


@dataclass(frozen=True)
class _Refusal:
    fingerprint: tuple
    reason: str
    message: str


class _VersionObserver:
    """Forwards the batcher's reports to the server's observer and feeds the version's statistics."""

    def __init__(self, stats: InferenceStats, outer: BatchObserver | None) -> None:
        self.stats = stats
        self.outer = outer
        self.requests_in_batch = 1

    def batch_started(self, images: int, requests: int, waits: list[float]) -> None:
        self.requests_in_batch = requests
        self.stats.queued(waits)
        if self.outer:
            self.outer.batch_started(images, requests, waits)

    def batch_finished(self, images: int, seconds: float) -> None:
        if self.outer:
            self.outer.batch_finished(images, seconds)

    def request_dropped(self, reason: str) -> None:
        if self.outer:
            self.outer.request_dropped(reason)

    def queue_depth(self, requests: int) -> None:
        if self.outer:
            self.outer.queue_depth(requests)


def _timed_infer(
    run: Callable[[np.ndarray], np.ndarray], observer: _VersionObserver, stats: InferenceStats
) -> Callable[[np.ndarray], np.ndarray]:
    """The batcher's infer function, timing Triton's compute_input / compute_infer / compute_output."""

    def infer(images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        tensor = np.ascontiguousarray(
            images, dtype=np.float32
        )  # the input tensor onnxruntime reads
        ready = time.perf_counter()
        outputs = run(tensor)
        computed = time.perf_counter()
        outputs = np.asarray(
            outputs, dtype=np.float32
        )  # the outputs, as the batcher hands them back
        done = time.perf_counter()
        stats.batch_computed(
            len(images),
            observer.requests_in_batch,
            ready - started,
            computed - ready,
            done - computed,
        )
        return outputs

    return infer


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


def _file_stamp(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


class ModelRegistry(ModelTable):
    """The lookup table (ModelTable) kept in line with the repository: sync, load, refuse, retire, drain."""

    def __init__(self, options: RegistryOptions, observer: LifecycleObserver | None = None) -> None:
        if options.control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {', '.join(CONTROL_MODES)}")
        super().__init__(options.model_names, options.max_batch_size)
        self.options = options
        self._observer = observer or _NoLifecycleObserver()
        self._explicit: set[str] = set(options.model_names)  # explicit mode: the models asked for
        self._refused: dict[tuple[str, int], _Refusal] = {}
        # (name, version) -> (files' fingerprint, sha256) of each served version when it was checked.
        self._loaded: dict[tuple[str, int], tuple[tuple, str]] = {}
        self._orphans: set[tuple[str, int]] = set()  # served versions whose folder is gone
        self._config_refused: dict[
            str, tuple[tuple, str]
        ] = {}  # name -> (files' fingerprint, message)
        self._retiring: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    # ---- lookups (serving.inference.model_table): resolve, served, config, statistics ... ----

    @property
    def repository(self) -> Path:
        return Path(self.options.repository)

    @property
    def registry(self) -> ModelRegistry:
        """A ModelLookup's registry (serving.inference.served_model): this one."""
        return self

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Triton's RepositoryIndex: every model in the repository, each ready or refused version."""
        entries: list[IndexEntry] = []
        for name in sorted(set(list_models(self.repository)) | set(self._served)):
            versions = self._served.get(name, {})
            refused = {
                v: r for (n, v), r in self._refused.items() if n == name and v not in versions
            }
            entries += [IndexEntry(name, str(v), "READY") for v in sorted(versions)]
            if ready_only:
                continue
            entries += [
                IndexEntry(name, str(v), "UNAVAILABLE", r.message)
                for v, r in sorted(refused.items())
            ]
            if not versions and not refused:
                entries.append(
                    IndexEntry(
                        name,
                        "",
                        "UNAVAILABLE" if self._is_managed(name) else "",
                        "no version could load" if self._is_managed(name) else "unloaded",
                    )
                )
        return entries

    # ---- lifecycle: coroutines on the event loop, one at a time ----

    async def start(self) -> None:
        """Load what the mode asks for at start; raise RepositoryError when a model has no version to serve."""
        names = self._managed_names()
        if not names and self.options.control_mode != "explicit":
            raise RepositoryError(no_versions_message(self.repository))
        await self.sync(names)
        for name in sorted(names):
            if not self._served.get(name):
                raise RepositoryError(self._why_not_served(name))

    async def sync(self, names: Iterable[str] | None = None) -> None:
        """Bring the served versions of `names` (default: the managed models) in line with the repository."""
        async with self._lock:
            for name in sorted(
                set(names) if names is not None else self._managed_names() | set(self._served)
            ):
                await self._sync_model(name)

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: load (or reload) `name` per its policy. Explicit mode only."""
        self._require_explicit("load")
        if not is_model_name(
            name
        ):  # a client's string becomes a path here: no '..', no NUL, bounded
            raise UnknownModel(f"no model {quoted(name)} in the repository: {NAME_RULE}")
        if not (self.repository / name).is_dir():
            raise UnknownModel(f"no model '{name}' in the repository {self.repository}")
        self._explicit.add(name)
        await self.sync([name])
        if not self._served.get(name):
            raise ModelLoadFailed(f"failed to load '{name}': {self._why_not_served(name)}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving every version of `name`, after its accepted calls finish."""
        self._require_explicit("unload")
        if not is_model_name(name):  # nor may a client's string become a registry entry
            raise UnknownModel(f"no model {quoted(name)} in the repository: {NAME_RULE}")
        self._explicit.discard(name)
        async with self._lock:
            retired = self._served.get(name, {})
            self._publish(name, {})
            await asyncio.gather(*(self._retire(model, now=False) for model in retired.values()))
            retired = {}
            await asyncio.get_running_loop().run_in_executor(None, release_memory)

    async def close(self) -> None:
        """Refuse new work on every version and finish what each has queued (the server's drain)."""
        async with self._lock:
            models = self.served()
            await asyncio.gather(*(model.batcher.close() for model in models), *self._retiring)

    # ---- internals ----

    def _managed_names(self) -> set[str]:
        if self.options.control_mode == "explicit":
            return set(self._explicit)
        if self.options.model_names:
            return set(self.options.model_names)
        return set(list_models(self.repository))

    def _is_managed(self, name: str) -> bool:
        return name in self._managed_names()

    def _require_explicit(self, action: str) -> None:
        if self.options.control_mode != "explicit":
            # Triton's own words (and code, UNAVAILABLE), which its users' scripts look for.
            raise ModelControlDisabled(
                f"explicit model load / unload is not allowed if polling is enabled (--model-control-mode "
                f"{self.options.control_mode}; {action} refused): "
                + (
                    "the server polls the repository, so publish or remove version folders instead"
                    if self.options.control_mode == "poll"
                    else "restart with --model-control-mode explicit"
                )
            )

    def _why_not_served(self, name: str) -> str:
        if name in self._config_refused:
            return self._config_refused[name][1]
        refusals = [r for (n, _v), r in sorted(self._refused.items(), reverse=True) if n == name]
        if refusals:
            return refusals[0].message
        on_disk = list_versions(self.repository, name)
        pinned = self.options.pinned_version
        if pinned is not None and on_disk:
            return (
                f"model '{name}' has no version {pinned} under {self.repository} "
                f"(available: {', '.join(map(str, on_disk))})"
            )
        if not on_disk:
            return no_versions_message(self.repository, name)
        return f"model '{name}': its version_policy selects none of the versions {on_disk}"

    def _policy(self, config: ModelConfig) -> VersionPolicy:
        if self.options.pinned_version is not None:
            return VersionPolicy("specific", versions=(self.options.pinned_version,))
        return version_policy(config)

    async def _sync_model(self, name: str) -> None:
        model_dir = self.repository / name
        current = self._served.get(name, {})
        if not self._is_managed(name) or not model_dir.is_dir():
            if current:
                log.info(
                    "model '%s' %s: unloading versions %s",
                    name,
                    "left the repository" if not model_dir.is_dir() else "is not managed",
                    sorted(current),
                )
            self._publish(name, {})
            for model in current.values():
                self._retire(model)
            return
        try:
            config = read_model_config(model_dir, self.options.max_batch_size)
        except (ConfigError, OSError) as err:
            self._refuse_config(name, model_dir, str(err))
            if name not in self._configs:
                return
            config = self._configs[
                name
            ]  # keep following the last good config.pbtxt until it is fixed
        else:
            self._config_refused.pop(name, None)
        policy = self._policy(config)
        try:
            on_disk = list_versions(self.repository, name)
        except (
            OSError
        ) as err:  # the folder went away between two looks: the next poll sees what is left
            log.warning(
                "model '%s': cannot list its versions (%s); trying again at the next poll",
                name,
                err,
            )
            return
        loaded: dict[int, ServedModel] = {}
        try:
            current, replaced = await self._recheck_changed(name, current)
            # A served version stays a candidate even when a change to its files was refused.
            candidates = [v for v in on_disk if v in current or not self._still_refused(name, v)]
            while True:
                missing = sorted(
                    policy.select(candidates) - current.keys() - loaded.keys(), reverse=True
                )
                if not missing:
                    break
                for number in missing:
                    try:
                        loaded[number] = await self._load(name, number)
                    except LoadFailure:
                        candidates.remove(number)
        except BaseException:
            for model in loaded.values():  # never published: no call reached them
                self._retire(model, now=True)
            raise
        wanted = policy.select(candidates)
        served = {v: m for v, m in {**current, **loaded}.items() if v in wanted}
        served = self._keep_orphans(name, current, served, on_disk)
        self._configs[name] = config
        self._publish(name, served)  # the switch: one assignment
        for model in replaced:
            self._retire(model)
        for number, model in {**current, **loaded}.items():
            if number not in served:
                self._retire(model)
        if loaded or replaced:
            log.info(
                "model '%s' (%s) now serves versions %s", name, policy.describe(), sorted(served)
            )

    async def _recheck_changed(
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
            if not stamp or known is None or stamp == known[0] or self._still_refused(name, number):
                continue  # deleted (see _keep_orphans), unchanged, or a change already refused
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

    def _keep_orphans(
        self,
        name: str,
        current: dict[int, ServedModel],
        served: dict[int, ServedModel],
        on_disk: list[int],
    ) -> dict[int, ServedModel]:
        """When every served version's folder is gone and nothing replaces them, keep them serving."""
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

    async def _load(self, name: str, number: int) -> ServedModel:
        """Check and open a version, batcher started; LoadFailure (refused, logged, counted) if not."""
        stamp = fingerprint(
            self.repository / name / str(number)
        )  # before reading: a later change is news
        opened = await self._open(name, number, stamp)
        return self._serve(name, number, opened, stamp)

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
        observer = _VersionObserver(stats, batches)
        batcher = DynamicBatcher(
            _timed_infer(opened.runtime.run, observer, stats),
            options.max_batch_size,
            options.max_queue_delay,
            options.max_queue_size,
            observer,
            run_lone_inline=opened.runtime.provider == CPU,
        )
        batcher.start()
        self._refused.pop((name, number), None)
        self._loaded[(name, number)] = (stamp, opened.sha256)
        self._observer.version_loaded(name, number, opened.runtime.provider)
        return ServedModel(
            opened.version, opened.runtime.provider, options.max_batch_size, batcher, stats
        )

    def _refuse(self, name: str, number: int, failure: LoadFailure, stamp: tuple) -> None:
        self._refused[(name, number)] = _Refusal(stamp, failure.reason, failure.message)
        self._observer.load_failed(name, failure.reason)
        serving = sorted(self._served.get(name, {}))
        if number in serving:
            known = self._loaded.get((name, number), ((), ""))[1]
            after = f"version {number} keeps serving the copy it loaded before the change (sha256 {known[:12]}…)"
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

    def _refuse_config(self, name: str, model_dir: Path, message: str) -> None:
        stamp = _file_stamp(
            model_dir / "config.pbtxt"
        )  # the file's own: a new version is no new refusal
        if (
            name not in self._config_refused or self._config_refused[name][0] != stamp
        ):  # once per change
            self._config_refused[name] = (stamp, message)
            self._observer.load_failed(name, "config")
            log.warning(
                "model '%s' config refused: %s; the last good one stays in force", name, message
            )

    def _still_refused(self, name: str, number: int) -> bool:
        """A refused version is tried again only once its files have changed."""
        refusal = self._refused.get((name, number))
        return refusal is not None and refusal.fingerprint == fingerprint(
            self.repository / name / str(number)
        )

    def _retire(self, model: ServedModel, now: bool = False) -> asyncio.Task:
        """Drain a version no call can reach any more, then let it go."""
        task = asyncio.get_running_loop().create_task(
            self._drain(model, 0.0 if now else self.options.retire_delay)
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain(self, model: ServedModel, delay: float) -> None:
        await asyncio.sleep(
            delay
        )  # calls that looked it up before the switch and have not queued yet
        await model.batcher.close()
        name, version = model.name, model.version_label
        if model.version.version not in self._served.get(
            name, {}
        ):  # not replaced by a new copy of it
            self._observer.version_unloaded(name, model.version.version, model.provider)
            self._loaded.pop((name, model.version.version), None)
        del model  # the last reference to its onnxruntime sessions
        await asyncio.get_running_loop().run_in_executor(None, release_memory)
        log.info("model '%s' version %s unloaded after its accepted calls finished", name, version)
