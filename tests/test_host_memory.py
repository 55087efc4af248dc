"""The training process's host-memory policy: with it, a large freed tensor's memory stays with the process and later
tensors of its size reuse it; without it, glibc hands the block back to the kernel when it is freed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparselm.config import Config, apply_overrides, to_toml

PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from sparselm.host_memory import keep_freed_memory

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    not_kept = keep_freed_memory() if sys.argv[1] == "keep" else "not asked"
    before, faults, resident = resident_mb(), [], []
    for step in range(10):  # a "step": a 256 MiB activation and a 32 MiB one computed from it, then freed
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        big = torch.ones(256 * 2**20 // 4)
        small = big[: 8 * 2**20] * 2
        del big
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
        resident.append(resident_mb() - before)
        del small
    print(json.dumps({"not_kept": not_kept, "faults": faults, "resident": resident}))
    """
)


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_kept_and_reused_only_when_asked() -> None:
    """glibc's default maps each large block afresh, so every "step" faults its 256 MiB in again (65k pages of
    4 KiB); kept, later steps reuse what the first ones faulted in and the resident set stops growing (two steps'
    worth when run alone, five in one run under the whole suite: blocks the heap could not merge)."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc/self/statm to read the resident set from")
    keep = _probe("keep")
    if keep["not_kept"] is not None:
        pytest.skip(f"keep_freed_memory does not apply here: {keep['not_kept']}")
    default = _probe("default")
    pages = 256 * 2**20 // 4096
    assert min(default["faults"][-3:]) > 0.9 * pages
    assert max(keep["faults"][-3:]) < 0.05 * pages  # the first steps fault in what later ones reuse
    assert max(default["resident"]) < 300
    assert keep["resident"][-1] - keep["resident"][-3] < 16  # it stops growing: reused, not leaked


def test_the_policy_is_a_train_setting_that_defaults_to_on() -> None:
    cfg = Config()
    assert cfg.train.keep_freed_memory is True
    off = apply_overrides(Config(), ["train.keep_freed_memory=false"])
    assert off.train.keep_freed_memory is False
    assert "keep_freed_memory = false" in to_toml(off)
