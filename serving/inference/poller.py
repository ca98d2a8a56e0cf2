"""--model-control-mode poll: sync the registry with the repository every --repository-poll-secs.

A poll lists folders and stats files; only a new or changed version folder costs more (its
checks run in a worker thread while the served versions keep answering).
"""

from __future__ import annotations

import asyncio
import logging

from serving.inference.registry import ModelRegistry

log = logging.getLogger("mnist-serve")


class RepositoryPoller:
    def __init__(self, registry: ModelRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.registry.sync()
            except Exception:  # noqa: BLE001 - a poll that fails must not stop the next one
                log.exception("repository poll failed; trying again in %.1f s", self.interval)
