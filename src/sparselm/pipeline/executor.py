"""Where shard tasks run: in this process, in a local process pool, or on a dask cluster.

Every executor has the same contract: ``map_unordered(fn, tasks)`` yields ``(task, fn(task))`` as tasks finish, in
any order. ``fn`` must be a module-level function and tasks picklable; outputs go to files named by the task, so
with dask the output directory must be on storage every worker can reach (NFS, a shared volume).

Why dask and not Ray for the distributed option: the shard stage is embarrassingly parallel and needs only "run
this function on these arguments somewhere and tell me when it is done", which ``dask.distributed`` gives in a few
MB of pure-Python wheels (``dask``, ``distributed``) that install in seconds; Ray brings a ~70 MB wheel with its
own C++ object store and raylet processes, heavy for a 2-core development machine and for CI. Both connect to an
existing cluster; dask's ``LocalCluster`` is the local mode the tests run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from sparselm.errors import InputError

T = TypeVar("T")
R = TypeVar("R")


class InlineExecutor:
    """Runs tasks one by one in this process (workers <= 1): simplest to debug, no pickling."""

    name = "inline"

    def map_unordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        for task in tasks:
            yield task, fn(task)

    def close(self) -> None:
        pass


class LocalExecutor:
    """A pool of ``workers`` processes; at most ``2 * workers`` tasks are in flight so memory stays flat."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers)

    def map_unordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        pending: dict[Future[R], T] = {}
        for task in tasks:
            pending[self.pool.submit(fn, task)] = task
            while len(pending) >= 2 * self.workers:
                yield from self._drain(pending)
        while pending:
            yield from self._drain(pending)

    @staticmethod
    def _drain(pending: dict[Future[R], T]) -> Iterator[tuple[T, R]]:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            task = pending.pop(future)
            yield task, future.result()  # a worker exception is a bug, not bad data: let it surface

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Tasks on a dask cluster: an existing scheduler at ``address``, or a ``LocalCluster`` of ``workers``
    single-threaded worker processes (``processes=False`` runs them as threads of this process, for tests)."""

    name = "dask"

    def __init__(self, workers: int, address: str = "", processes: bool = True) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise InputError("run.executor = 'dask' needs dask.distributed: pip install 'sparselm[pipeline]'") from exc
        self.cluster = None
        if address:
            self.client = Client(address)
        else:
            self.cluster = LocalCluster(
                n_workers=max(workers, 1),
                threads_per_worker=1,
                processes=processes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)

    def map_unordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        from dask.distributed import as_completed

        tasks = list(tasks)
        # pure=False: a task is never skipped because dask thinks it has seen the same arguments before.
        futures = self.client.map(fn, tasks, pure=False)
        owner = {future.key: task for future, task in zip(futures, tasks, strict=True)}
        for future in as_completed(futures):
            yield owner[future.key], future.result()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(kind: str, workers: int, address: str = "", **options: Any) -> Any:
    """``kind`` is "local" or "dask"; local with ``workers`` <= 1 runs inline."""
    if kind == "dask":
        return DaskExecutor(workers, address, **options)
    if kind != "local":
        raise InputError(f"unknown executor {kind!r} (expected local or dask)")
    return InlineExecutor() if workers <= 1 else LocalExecutor(workers)
