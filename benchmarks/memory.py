"""Resident-set size of this process (Linux /proc), for the benchmarks' peak-memory columns.

``VmHWM`` is the peak RSS since the process started or since the peak was last reset (writing 5 to
``/proc/self/clear_refs``, Linux 4.0+), so a step's peak is measured by resetting just before it. Elsewhere the
functions return NaN (and the reset does nothing): the tables then show no figure rather than a wrong one.
"""

from __future__ import annotations

import math


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
