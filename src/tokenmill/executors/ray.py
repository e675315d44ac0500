"""Run shard tasks on a Ray cluster, one Ray task per shard, results in input order.

Plain Ray tasks rather than Ray Data: a shard task reads its Parquet file and writes its outputs itself,
so no rows flow through Ray and Ray Data's streaming blocks and backpressure have nothing to carry.
Ray Data would instead convert the items (which hold ``Step`` objects) and the results into Arrow
blocks, changing their types (a fit partial's tuples come back as lists) unless each is pickled in and
out by hand, and it needs ``override_num_blocks`` to keep one shard per task and a process-wide
``DataContext`` change to keep order. A bounded window of tasks does the same job: it keeps order by
index, surfaces the first failure at once, and never holds more than a few tasks' arguments (a fitted
step can be large) in the object store.

Every node must see the shard paths at the same location (a shared file system such as NFS, Lustre
or a FUSE-mounted bucket), and every node must have tokenmill installed (the same version) along with
any module that defines a custom step. On a local cluster started here, workers get the driver's
``sys.path``, so whatever the driver can import they can too.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from tokenmill import TokenmillError

try:
    import ray
except ImportError as err:  # an optional extra: say how to get it
    raise TokenmillError("the Ray executor needs Ray: pip install 'tokenmill[ray]'") from err

TASKS_PER_CPU = 2  # in flight: enough to keep every CPU busy while results come back


class RayExecutor:
    def __init__(self, address: str | None = None, num_cpus: int | None = None, progress: bool = True):
        """Attach to the cluster at ``address`` ("auto", "ray://host:10001", ...) or start a local one.

        Without an address a new local cluster starts even if one is running, unless the
        ``RAY_ADDRESS`` environment variable names one (as ``ray job submit`` does). If Ray is
        already initialised in this process, that connection is used and left open on close.
        """
        if address is not None and num_cpus is not None:
            raise TokenmillError(f"num_cpus={num_cpus} sizes a local Ray cluster, but ray_address="
                                 f"{address!r} attaches to an existing one: set only one of them")
        self.progress = progress
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if address is None:
                path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
            else:
                ray.init(address=address)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        """``[fn(x) for x in items]`` in input order, one Ray task per item.

        On the first failure no more tasks start; those already running finish, and since each
        writes its outputs atomically, a rerun reuses them. (They are not cancelled: in Ray 2.60
        cancelling right after a task failed crashed the driver.)
        """
        items = list(items)
        task = ray.remote(fn)
        window = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        results: list[Any] = [None] * len(items)
        in_flight: dict[ray.ObjectRef, int] = {}
        submitted = 0
        bar = tqdm(total=len(items), desc=desc, unit="shard", disable=not self.progress or not items,
                   leave=False)
        try:
            while submitted < len(items) or in_flight:
                while submitted < len(items) and len(in_flight) < window:
                    in_flight[task.remote(items[submitted])] = submitted
                    submitted += 1
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                results[in_flight.pop(done)] = ray.get(done)
                bar.update()
            return results
        except ray.exceptions.RayTaskError as err:
            raise err.cause from err  # the step's own exception, as the local executor raises it
        finally:
            bar.close()

    def close(self) -> None:
        """Shut down the local cluster or connection this executor started; leave others alone."""
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
