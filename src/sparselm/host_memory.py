"""Host memory policy of a training process: freed blocks stay with the process for the next step.

A training step on a CPU allocates and frees the same large tensors every step (activations, logits chunks,
gradients). glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap`` calls and
gives them back with ``munmap`` when freed, so every step the kernel faults those pages in again and zeroes them,
and every ``zero_grad(set_to_none=True)`` unmaps the gradients. ``keep_freed_memory`` tells glibc to serve every
block from its heap and never trim it: after the first steps, a step reuses memory it already holds. The
resident set then stays up between steps instead of dropping after each one, at the largest step's footprint or
somewhat above it where the heap holds blocks it cannot merge (-3% to +10% of peak RSS on this project's steps).
Measured in docs/benchmarks.md ("Freed memory kept for the next step"). Allocators other than glibc's (musl,
macOS, a preloaded jemalloc or tcmalloc) keep their own policy: the call reports that and changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int argument takes (bytes of free heap top kept)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str | None:
    """Make malloc keep freed memory for reuse, process-wide (it cannot be undone for blocks already kept).
    -> None when applied, else why not (this process's C library is not glibc, or glibc refused a setting)."""
    libc = _glibc()
    if libc is None:
        return f"the C library here is not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown'})"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1:
        return "glibc's mallopt refused M_MMAP_MAX=0 or M_TRIM_THRESHOLD"
    return None
