"""What the tests of `--workers N` read from a running server: its metrics, its workers' log lines
and processes."""

from __future__ import annotations

import re
import time
import urllib.request


def scrape(url: str) -> dict[str, float]:
    """The endpoint's samples, `name{labels}` -> value."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def wait_until_gone(pid: int, seconds: float = 10) -> bool:
    """Whether `pid` exits (or is a zombie awaiting its reaper) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def wait_for_both_workers(server, seconds: float = 60) -> None:
    """start_server returns when one worker answers SERVING; the other may still be loading."""
    deadline = time.monotonic() + seconds
    while len(re.findall(r"\[worker \d\]: serving ", server.log())) < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


def child_pids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return {int(child) for child in children.read().split()}
