"""Run shard tasks on a local process pool (or inline with one worker, which is easiest to debug).

Memory stays bounded by the pool size: each task reads one shard, returns a small result, and the
parent never holds more than the results.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker blocks on a queue whose write end it holds itself, so it never sees its parent die:
    after a kill -9 of ``tokenmill run`` it would live on, and so would the resource tracker that
    waits for every holder of its pipe. The kernel signals the worker instead (Linux only); a parent
    that died before prctl ran is caught by the ppid check."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(parent: int) -> None:
    """One process per core already fills the machine: BLAS/OpenMP threads inside each worker would
    only oversubscribe it (seen as a several-fold slowdown of torch and numpy on 2 cores)."""
    _die_with_parent(parent)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LocalExecutor:
    def __init__(self, workers: int | None = None, progress: bool = True):
        self.workers = workers or default_workers()
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: workers start clean (no inherited threads from torch/tqdm in the parent).
            # A worker is started by the thread calling map and gets its death signal when that
            # thread ends, so map must run on a thread that outlives the pool (callers use the main one).
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(os.getpid(),))
        return self._pool

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        """``[fn(x) for x in items]`` in input order, run on the pool."""
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, unit="shard", disable=not self.progress or not items,
                   leave=False)
        try:
            if self.workers <= 1 or len(items) <= 1:
                results = []
                for item in items:
                    results.append(fn(item))
                    bar.update()
                return results
            futures = [self._get_pool().submit(fn, item) for item in items]
            for fut in futures:
                fut.add_done_callback(lambda _f: bar.update())
            return [fut.result() for fut in futures]
        finally:
            bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
