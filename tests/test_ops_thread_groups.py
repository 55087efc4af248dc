"""The thread-group split of the experts (``sparselm.ops.ExpertThreads``): how experts are cut into groups, when the
automatic setting splits, and that an explicit thread count always does. (Bitwise equality of the split with the
serial loop is tested on the kernel itself, in test_ops_expert_loop.py.)"""

from __future__ import annotations

import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparselm.ops import ExpertLoopSettings, ExpertThreads, split_experts
from sparselm.ops.thread_groups import WEIGHT_COST_ROWS


def test_expert_groups_cover_every_expert_once_and_balance_cost() -> None:
    counts = [5, 0, 3, 100, 2, 0, 7, 60, 60]
    groups = split_experts(counts, 2)
    flat = [item for g in groups for item in g]
    assert [e for e, _ in flat] == [e for e, n in enumerate(counts) if n]  # contiguous, in order, no empty expert
    assert all(r.stop - r.start == counts[e] for e, r in flat) and flat[-1][1].stop == sum(counts)
    cost = [sum(counts[e] + WEIGHT_COST_ROWS for e, _ in g) for g in groups]
    assert len(groups) == 2 and max(cost) / min(cost) < 1.5
    assert split_experts([0, 0], 2) == [] and len(split_experts([4], 3)) == 1


def _thread_names(threads: ExpertThreads, counts: list[int]) -> list[str]:
    seen: list[str] = []

    def work(e: int, r: slice) -> None:
        seen.append(threading.current_thread().name)

    threads.run(work, counts)
    return seen


def test_experts_split_only_when_they_are_small() -> None:
    """The automatic setting splits small experts over the intra-op threads and leaves big ones to their own GEMMs."""
    threads = ExpertThreads(ExpertLoopSettings())
    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = _thread_names(threads, [1500, 0, 1600, 1400])  # >= split_below_rows rows per busy expert
        assert len(seen) == 3 and all(not name.startswith("sparselm-experts") for name in seen)
        seen = _thread_names(threads, [100, 0, 120, 90, 110])
        assert len(seen) == 4 and any(name.startswith("sparselm-experts") for name in seen)
        # The threshold is a setting of the op: below it here, so these big experts split too.
        seen = _thread_names(ExpertThreads(ExpertLoopSettings(split_below_rows=2000)), [1500, 0, 1600, 1400])
        assert len(seen) == 3 and any(name.startswith("sparselm-experts") for name in seen)
    finally:
        torch.set_num_threads(intra)


def test_explicit_thread_count_splits_whatever_the_size_and_one_is_serial() -> None:
    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        forced = ExpertThreads(ExpertLoopSettings(threads=2))
        assert len(forced.groups([1500, 0, 1600, 1400])) == 2
        seen = _thread_names(forced, [1500, 0, 1600, 1400])
        assert any(name.startswith("sparselm-experts") for name in seen) and forced.workers == 1
        assert torch.get_num_threads() == 1  # the caller's thread count is restored
        torch.set_num_threads(2)
        serial = ExpertThreads(ExpertLoopSettings(threads=1))
        assert len(serial.groups([10, 20, 30])) == 1 and serial.workers == 0
    finally:
        torch.set_num_threads(intra)


def test_dispatch_modes_keep_every_expert_on_the_calling_thread() -> None:
    """Dispatch modes (op counters, fake tensors) are per thread: a split would hide ops from them."""

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    threads = ExpertThreads(ExpertLoopSettings(threads=2))
    with Passthrough():
        assert len(threads.groups([10, 20, 30])) == 1
    assert len(threads.groups([10, 20, 30])) == 2
