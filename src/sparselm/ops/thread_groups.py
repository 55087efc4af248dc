"""Run one piece of work per expert, the experts cut into groups that run at the same time on several threads.

Expert-sized GEMMs (a few hundred rows) scale poorly over intra-op threads: each is too small to split well, and
thousands of them per step each pay for waking the threads. So with T > 1 threads the experts are cut into T
contiguous groups of similar cost that run concurrently, every GEMM single-threaded. Each expert writes only its own
rows and its own gradient slice, so the result is bitwise that of the serial loop on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparselm.ops.settings import ExpertLoopSettings

Work = Callable[[int, slice], None]  # work(expert, its rows)

# Per-expert cost in rows for casting and reading its weights, whatever its rows.
WEIGHT_COST_ROWS = 32


def split_experts(counts: list[int], parts: int) -> list[list[tuple[int, slice]]]:
    """(expert, row slice) of every expert with rows, cut into at most ``parts`` contiguous groups of similar cost
    (an expert costs its rows plus ``WEIGHT_COST_ROWS``). Empty groups are left out."""
    items, start = [], 0
    for e, n in enumerate(counts):
        if n:
            items.append((e, slice(start, start + n)))
        start += n
    cost = [n + WEIGHT_COST_ROWS for n in counts if n]
    total, groups, current, acc = sum(cost), [], [], 0.0
    for item, c in zip(items, cost, strict=True):
        # Close the group when this expert's midpoint lies past the group's share of the total cost.
        if current and len(groups) < parts - 1 and acc + c / 2 > total * (len(groups) + 1) / parts:
            groups.append(current)
            current = []
        current.append(item)
        acc += c
    groups.append(current)
    return [g for g in groups if g]


class ExpertThreads:
    """Calls ``work(expert, rows)`` for every expert with rows, in groups over threads (see the module docstring).

    Holds its worker pool, made on first need and grown when more groups are asked for."""

    def __init__(self, settings: ExpertLoopSettings) -> None:
        self.settings = settings
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def workers(self) -> int:
        """Worker threads in the pool (the calling thread runs one group itself): 0 until a split has run."""
        return self._pool_size

    def groups(self, counts: list[int]) -> list[list[tuple[int, slice]]]:
        """How ``run`` would cut these experts, given the settings and the current intra-op thread count."""
        threads = self.settings.threads or torch.get_num_threads()
        busy = [n for n in counts if n]
        if not self.settings.threads and busy and sum(busy) / len(busy) >= self.settings.split_below_rows:
            threads = 1  # experts this big keep every thread busy inside their own GEMMs
        if _get_current_dispatch_mode() is not None:
            threads = 1  # dispatch modes (op counters, fake tensors) are per thread: keep every op in their sight
        return split_experts(counts, max(threads, 1))

    def run(self, work: Work, counts: list[int]) -> None:
        groups = self.groups(counts)
        if len(groups) < 2:
            for group in groups:
                for e, r in group:
                    work(e, r)
            return

        inference = torch.is_inference_mode_enabled()

        def run_group(group: list[tuple[int, slice]]) -> None:
            # Grad and inference mode are per thread: give the workers the caller's (a Function's body runs without
            # grad; tensors made under inference mode may only be written under it).
            with torch.inference_mode() if inference else torch.no_grad():
                for e, r in group:
                    work(e, r)

        pool = self._pool_for(len(groups) - 1)
        intra = torch.get_num_threads()
        torch.set_num_threads(1)  # the calling thread runs the first group, single-threaded like the others
        try:
            futures = [pool.submit(run_group, g) for g in groups[1:]]
            run_group(groups[0])
            for f in futures:
                f.result()
        finally:
            torch.set_num_threads(intra)

    def _pool_for(self, workers: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < workers:
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # its threads are idle: nothing is submitted to it any more
            # OpenMP's thread count is per thread and a new thread starts from the default (all cores), so each
            # worker sets its own to 1 once, when it starts, or its "single-threaded" GEMMs would fan out again.
            self._pool = ThreadPoolExecutor(
                max_workers=workers,
                thread_name_prefix="sparselm-experts",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
            self._pool_size = workers
        return self._pool
