"""Resident-set size of this process (Linux /proc), for the benchmarks' peak-memory columns, and the host-memory
policy (``--allocator``) the training benchmarks run under.

``VmHWM`` is the peak RSS since the process started or since the peak was last reset (writing 5 to
``/proc/self/clear_refs``, Linux 4.0+), so a step's peak is measured by resetting just before it. Elsewhere the
functions return NaN (and the reset does nothing): the tables then show no figure rather than a wrong one.
"""

from __future__ import annotations

import argparse
import math

from sparselm.host_memory import keep_freed_memory


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return math.nan


def rss_mb() -> float:
    """Current resident-set size, MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident-set size since the last ``reset_peak_rss`` (or the start), MB."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Make the peak start again from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def add_allocator_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--allocator",
        choices=("keep", "default"),
        default="keep",
        help="keep: freed memory kept for the next step, as sparselm train sets it; default: glibc's own policy",
    )


def apply_allocator(choice: str) -> str:
    """Set this process's host-memory policy as ``--allocator`` says. -> the phrase the tables print."""
    not_kept = keep_freed_memory() if choice == "keep" else "--allocator default"
    if not_kept is None:
        return "freed memory kept for the next step, as `sparselm train` runs (`train.keep_freed_memory`)"
    return f"the C library's default ({not_kept})"
