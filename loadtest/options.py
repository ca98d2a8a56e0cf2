"""Every load-test option's default, defined once.

run.py, batching_study.py, locust_runner.py and the locustfile's own Locust options all read
their defaults here. Standard library only: the locustfile imports it before gevent patches.
"""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = ("single", "batch", "kserve", "rest", "mix")


@dataclass(frozen=True)
class LoadDefaults:
    scenario: str = "mix"
    users: int = 32
    spawn_rate: float = 10.0  # users started per second
    run_time: str = "60s"  # Locust's notation
    images_per_call: int = 16  # the batch scenario's images per Classify call
    mix_weights: tuple[int, ...] = (
        6,
        3,
        1,
    )  # single, batch, kserve[, rest] calls in the mix scenario
    pool_size: int = 2000  # MNIST test images screened for the load pool
    rpc_timeout: float = 10.0  # seconds, each gRPC call's deadline
    stop_timeout: float = 5.0  # seconds Locust lets users finish their call when the run ends

    @property
    def mix_weights_text(self) -> str:
        return ",".join(map(str, self.mix_weights))


DEFAULTS = LoadDefaults()
