"""Memory that a call frees goes back to the operating system at once (glibc's malloc).

glibc serves large allocations (a 15 MB request, its parsed message, a batch's arrays) with
mmap and unmaps them on free, but it raises that threshold to the size of each large block it
frees, up to 32 MB: after a few large requests, blocks of that size come from the heap instead,
where free() keeps them. Measured on the server: nine 15 MB bad requests in a row took RSS from
114 to 155 MB, for good. A fixed threshold keeps large blocks mmapped (RSS back to within 10 %).

It is fixed at 1 MiB, not at glibc's initial 128 kB: an ordinary call's blocks (a 64-image FP32
request is 200 kB, and its batch and copies as large) then come from the heap and are reused,
where at 128 kB each was a fresh mmap whose pages faulted in on every call (measured at 8 callers
x 64 images: 12 % fewer images/s). Anything an ordinary call needs stays under 1 MiB; the
megabytes of an absurd request still go straight back to the system.

Also the one place that hands freed memory back on purpose (release_memory, after a model
version is unloaded; the trimmer, after large requests) and that reads a process's resident
memory from /proc (rss_bytes), for the trimmer and for what measures a server from outside.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD_BYTES = (
    1024 * 1024
)  # fixed: over every ordinary call's blocks, under any absurd one's


def keep_large_blocks_mmapped(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold, so that blocks over it stay mmapped (unmapped on free).

    False where there is no glibc, or MALLOC_MMAP_THRESHOLD_ already decides.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of one process (Linux: /proc/<pid>/statm, the same figure as VmRSS).

    OSError when there is no such process, or no /proc.
    """
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0): every arena's free pages back to the system; None without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def release_memory() -> None:
    """Hand the memory of unloaded onnxruntime sessions back to the system.

    glibc keeps freed heap pages in its arenas; measured here, RSS grew about 1.7 MiB per
    onnxruntime session created and freed (20 switches: +18 %) and stays flat with malloc_trim.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim()


def start_trimmer(interval: float = 1.0, growth: float = 0.05) -> bool:
    """A daemon thread that hands free heap memory back (malloc_trim) when RSS has grown.

    Memory freed by threads other than the main one sits in glibc's per-thread arenas, which
    give it back only when their top is free; gRPC's threads receive and free large requests
    there. Every `interval` seconds, when RSS is over `growth` above what it was after the last
    trim, malloc_trim(0) returns the free pages of every arena. It runs outside the GIL (ctypes
    releases it) and only after RSS grew, so a steady server never calls it.
    """
    trim = _malloc_trim()
    try:
        rss_bytes()
    except OSError:  # no /proc
        return False
    if trim is None:
        return False

    def run() -> None:
        settled = rss_bytes()
        while True:
            time.sleep(interval)
            if rss_bytes() > settled * (1 + growth):
                trim()
                settled = rss_bytes()

    threading.Thread(target=run, name="malloc-trim", daemon=True).start()
    return True


# ---- measuring a server from outside: every process of it (with --workers, the parent loads no
# model; the workers hold the memory), by /proc (Linux) ----


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants, summed (shared pages counted in each)."""
    return sum(tree_rss_by_process(pid).values())


def tree_rss_by_process(pid: int) -> dict[int, int]:
    """Resident bytes of each process of the tree (pid -> bytes)."""
    sizes = {}
    for member in process_tree(pid):
        try:
            sizes[member] = rss_bytes(member)
        except OSError:
            continue
    return sizes


def tree_open_fds(pid: int) -> int:
    """Open file descriptors (sockets included) of `pid` and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
    return total


# ---- fitting the queue to a container's memory limit ----

# Measured (docs/reliability.md): an idle worker holding the article model is about 115 MiB RSS,
# the parent of --workers about 82 MiB, multiprocessing's resource tracker 11 MiB; each queued
# 64-image call about 0.43 MiB (its request, its float32 array, the batch it joins).
PARENT_BYTES = 100 * 2**20
WORKER_BYTES = 130 * 2**20
BYTES_PER_QUEUED_IMAGE = 3 * 28 * 28 * 4  # request as FP32, the decoded array, its batch copy
MIN_QUEUE, MAX_QUEUE = 8, 1024


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (docker run --memory, a Kubernetes limit), or None."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            continue
        return limit if limit < 2**60 else None  # cgroup v1 writes a huge number for "no limit"
    return None


def queue_size_for(limit: int, workers: int, max_batch_size: int) -> int:
    """Queued calls per worker that keep the whole server under `limit` bytes.

    What the workers hold at rest (their model, onnxruntime, gRPC) is estimated, 80 % of the
    limit is the target, half of what is left goes to the queues and the other half to what
    the queues do not count (messages being received, answers being sent, allocator slack).
    A queued call costs at most max_batch_size images' worth of bytes three times over.
    """
    spare = 0.8 * limit - PARENT_BYTES - workers * WORKER_BYTES
    per_call = max_batch_size * BYTES_PER_QUEUED_IMAGE
    return max(MIN_QUEUE, min(MAX_QUEUE, int(0.5 * spare / workers / per_call)))


def fit_to_memory_limit(config, workers_auto: bool, queue_auto: bool, limit: int | None = None):
    """`config` (a resolved ServeConfig) with fewer workers and a shorter queue where a memory limit
    needs them, and the line that says so (None when nothing changed).

    Only settings left to their defaults change: an explicit --workers or --max-queue-size stays.
    """
    import dataclasses

    limit = cgroup_memory_limit() if limit is None else limit
    if limit is None:
        return config, None
    per_call = config.max_batch_size * BYTES_PER_QUEUED_IMAGE
    workers = config.workers
    if workers_auto:
        fits = int((0.8 * limit - PARENT_BYTES) // (WORKER_BYTES + 2 * MIN_QUEUE * per_call))
        workers = max(1, min(workers, fits))
    queue = (
        queue_size_for(limit, workers, config.max_batch_size)
        if queue_auto
        else config.max_queue_size
    )
    if (workers, queue) == (config.workers, config.max_queue_size):
        return config, None
    line = (
        f"memory limit {limit / 2**20:.0f} MiB: {workers} worker(s), --max-queue-size {queue} each "
        f"(a queued call of {config.max_batch_size} images holds up to {per_call / 2**20:.1f} MiB); "
        "set --workers / --max-queue-size to choose"
    )
    return dataclasses.replace(config, workers=workers, max_queue_size=queue), line
