"""The model registry: every served model, its ready versions, each version with its own batcher.

    models -> versions -> ServedModel (onnxruntime session + DynamicBatcher + statistics)

The lookups (`resolve`, `is_ready`, ...) are the table's (serving.inference.model_table); this
module keeps that table in line with the repository.

`sync()` brings the served versions in line with the repository and each model's
version_policy (serving.inference.version_policy): a version passes its checks (the gate,
serving.inference.version_gate) in a worker thread while the old ones keep serving, then the new
set of versions replaces the old in one assignment. Versions that leave the set are retired: no
new call reaches them, and after `retire_delay` (for calls that looked them up and have not
queued yet, e.g. while reading an HTTP body) their batcher finishes what is queued and closes.

A version that fails its checks is refused, and a served version whose files change is checked
again (the gate says how). The repository changing under a served version never costs a call,
because its onnxruntime session holds the model in memory: a served version's folder deleted is
retired as Triton does, and calls move to the versions the policy picks from what remains; when
nothing else can serve, the loaded copy keeps serving (one line, reason "deleted") until a valid
version appears: unloading would turn every call into an error while the model is still in
memory. A config.pbtxt that cannot be read leaves the last good one in force.

Model control (Triton's modes):
`none` syncs once at start, `poll` syncs every --repository-poll-secs (serving.inference.poller),
`explicit` syncs the models that load()/unload() name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.repository import RepositoryError, list_versions, no_versions_message
from serving.inference.errors import ModelControlDisabled, ModelLoadFailed, UnknownModel, quoted
from serving.inference.loader import LoadFailure
from serving.inference.model_config import (
    ConfigError,
    ModelConfig,
    read_model_config,
    version_policy,
)
from serving.inference.model_table import ModelTable
from serving.inference.names import NAME_RULE, is_model_name
from serving.inference.observers import LifecycleObserver, NoLifecycleObserver
from serving.inference.repository_scan import list_models
from serving.inference.runtime import RuntimeOptions
from serving.inference.served_model import ServedModel
from serving.inference.version_gate import VersionGate
from serving.inference.version_policy import VersionPolicy
from serving.memory import release_memory

log = logging.getLogger("mnist-serve")

CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True)
class RegistryOptions:
    repository: Path
    # (): every model in the repository (explicit mode: none at start)
    model_names: tuple[str, ...] = ()
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


class ModelRegistry(ModelTable):
    """The lookup table (ModelTable) kept in line with the repository: sync, load, retire, drain."""

    def __init__(self, options: RegistryOptions, observer: LifecycleObserver | None = None) -> None:
        if options.control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {', '.join(CONTROL_MODES)}")
        super().__init__(options.model_names, options.max_batch_size)
        self.options = options
        self._observer = observer or NoLifecycleObserver()
        self._gate = VersionGate(options, self._observer, self.ready_versions)
        self._explicit: set[str] = set(options.model_names)  # explicit mode: the models asked for
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
        """Triton's RepositoryIndex: each model of the repository, ready and refused versions."""
        entries: list[IndexEntry] = []
        for name in sorted(set(list_models(self.repository)) | set(self._served)):
            versions = self._served.get(name, {})
            refused = {
                v: r for v, r in self._gate.refused_versions(name).items() if v not in versions
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
        """Load what the mode asks for; RepositoryError when a model has no version to serve."""
        names = self._managed_names()
        if not names and self.options.control_mode != "explicit":
            raise RepositoryError(no_versions_message(self.repository))
        await self.sync(names)
        for name in sorted(names):
            if not self._served.get(name):
                raise RepositoryError(self._why_not_served(name))

    async def sync(self, names: Iterable[str] | None = None) -> None:
        """Bring the served versions of `names` (default: the managed models) in line."""
        async with self._lock:
            for name in sorted(
                set(names) if names is not None else self._managed_names() | set(self._served)
            ):
                await self._sync_model(name)

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: load (or reload) `name` per its policy. Explicit mode only."""
        self._require_explicit("load")
        # A client's string becomes a path here: no '..', no NUL, bounded.
        if not is_model_name(name):
            raise UnknownModel(f"no model {quoted(name)} in the repository: {NAME_RULE}")
        if not (self.repository / name).is_dir():
            raise UnknownModel(f"no model '{name}' in the repository {self.repository}")
        self._explicit.add(name)
        await self.sync([name])
        if not self._served.get(name):
            raise ModelLoadFailed(f"failed to load '{name}': {self._why_not_served(name)}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: retire every version of `name` once its accepted calls finish."""
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
                "explicit model load / unload is not allowed if polling is enabled "
                f"(--model-control-mode {self.options.control_mode}; {action} refused): "
                + (
                    "the server polls the repository, so publish or remove version folders instead"
                    if self.options.control_mode == "poll"
                    else "restart with --model-control-mode explicit"
                )
            )

    def _why_not_served(self, name: str) -> str:
        refused = self._gate.why_refused(name)
        if refused is not None:
            return refused
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
            self._unload_all(name, current, gone=not model_dir.is_dir())
            return
        config = self._current_config(name, model_dir)
        if config is None:
            return
        policy = self._policy(config)
        try:
            on_disk = list_versions(self.repository, name)
        except (
            OSError
        ) as err:  # the folder went away between two looks: the next poll sees the rest
            log.warning(
                "model '%s': cannot list its versions (%s); trying again at the next poll",
                name,
                err,
            )
            return
        current, replaced = await self._gate.recheck_changed(name, current)
        loaded, candidates = await self._load_selected(name, policy, current, on_disk)
        wanted = policy.select(candidates)
        served = {v: m for v, m in {**current, **loaded}.items() if v in wanted}
        served = self._gate.keep_orphans(name, current, served, on_disk)
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

    def _unload_all(self, name: str, current: dict[int, ServedModel], gone: bool) -> None:
        """The model left the repository (`gone`) or is no longer managed: retire every version."""
        if current:
            log.info(
                "model '%s' %s: unloading versions %s",
                name,
                "left the repository" if gone else "is not managed",
                sorted(current),
            )
        self._publish(name, {})
        for model in current.values():
            self._retire(model)

    def _current_config(self, name: str, model_dir: Path) -> ModelConfig | None:
        """The model's config.pbtxt; when it cannot be read, the last good one (None: none yet)."""
        try:
            config = read_model_config(model_dir, self.options.max_batch_size)
        except (ConfigError, OSError) as err:
            self._gate.refuse_config(name, model_dir, str(err))
            # Keep following the last good config.pbtxt until it is fixed.
            return self._configs.get(name)
        self._gate.config_accepted(name)
        return config

    async def _load_selected(
        self,
        name: str,
        policy: VersionPolicy,
        current: dict[int, ServedModel],
        on_disk: list[int],
    ) -> tuple[dict[int, ServedModel], list[int]]:
        """Load what the policy selects and is not served, past refusals: (loaded, candidates)."""
        # A served version stays a candidate even when a change to its files was refused.
        candidates = [v for v in on_disk if v in current or not self._gate.still_refused(name, v)]
        loaded: dict[int, ServedModel] = {}
        try:
            while True:
                missing = sorted(
                    policy.select(candidates) - current.keys() - loaded.keys(), reverse=True
                )
                if not missing:
                    return loaded, candidates
                for number in missing:
                    try:
                        loaded[number] = await self._gate.load(name, number)
                    except LoadFailure:
                        candidates.remove(number)
        except BaseException:
            for model in loaded.values():  # never published: no call reached them
                self._retire(model, now=True)
            raise

    def _retire(self, model: ServedModel, now: bool = False) -> asyncio.Task:
        """Drain a version no call can reach any more, then let it go."""
        task = asyncio.get_running_loop().create_task(
            self._drain(model, 0.0 if now else self.options.retire_delay)
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain(self, model: ServedModel, delay: float) -> None:
        await asyncio.sleep(delay)  # calls that looked it up before the switch, not queued yet
        await model.batcher.close()
        name, version = model.name, model.version_label
        if model.version.version not in self._served.get(name, {}):  # not replaced by a new copy
            self._observer.version_unloaded(name, model.version.version, model.provider)
            self._gate.forget(name, model.version.version)
        del model  # the last reference to its onnxruntime sessions
        await asyncio.get_running_loop().run_in_executor(None, release_memory)
        log.info("model '%s' version %s unloaded after its accepted calls finished", name, version)
