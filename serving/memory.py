"""Memory that a call frees goes back to the operating system at once (glibc's malloc).

glibc serves large allocations (a 15 MB request, its parsed message, a batch's arrays) with
mmap and unmaps them on free, but it raises that threshold to the size of each large block it
frees, up to 32 MB: after a few large requests, blocks of that size come from the heap instead,
where free() keeps them. Measured on the server: nine 15 MB bad requests in a row took RSS from
114 to 155 MB, for good. A fixed threshold keeps large blocks mmapped (RSS back to within 10 %).
The cost is a system call per allocation over the threshold, small next to a batch's inference.
"""
from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed


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
