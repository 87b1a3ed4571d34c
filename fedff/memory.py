"""The process's memory, as runs and workers report it (Linux; the peak elsewhere)."""

from __future__ import annotations

import ctypes
import resource


def rss_mb() -> float:
    """Current resident set size, falling back to the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc), so RSS shows what the process holds.

    Batches come and go as large short-lived buffers; without this, RSS at an epoch's end
    depends on where the allocator's high-water mark happened to be.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
