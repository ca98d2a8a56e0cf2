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
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD_BYTES = 1024 * 1024  # fixed: over every ordinary call's blocks, under any absurd one's


def keep_large_blocks_unmappable(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc, or MALLOC_MMAP_THRESHOLD_ already decides."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def _rss_pages() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])


def start_trimmer(interval: float = 1.0, growth: float = 0.05) -> bool:
    """A daemon thread that hands free heap memory back (malloc_trim) when RSS has grown.

    Memory freed by threads other than the main one sits in glibc's per-thread arenas, which
    give it back only when their top is free; gRPC's threads receive and free large requests
    there. Every `interval` seconds, when RSS is over `growth` above what it was after the last
    trim, malloc_trim(0) returns the free pages of every arena. It runs outside the GIL (ctypes
    releases it) and only after RSS grew, so a steady server never calls it.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
        _rss_pages()
    except (OSError, AttributeError):  # not glibc, or no /proc
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int

    def run() -> None:
        settled = _rss_pages()
        while True:
            time.sleep(interval)
            if _rss_pages() > settled * (1 + growth):
                malloc_trim(0)
                settled = _rss_pages()

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
            with open(f"/proc/{member}/statm") as statm:
                sizes[member] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
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
