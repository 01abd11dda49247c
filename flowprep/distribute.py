"""Distributors: run a function over many tasks, one function per engine, one signature.

    run(fn, tasks, workers, cluster) -> iterator of (key, result) as tasks finish

`tasks` are (key, args) pairs; a result is `fn(*args)`, or a `TaskLost` saying why a task could
not return one (its worker died on every attempt, or it raised: a bug, since store work turns
bad input into a record). Stopping the iteration early (a full disk, Ctrl-C) stops the workers.

- threads: this process (flowprep adopt: file reads and CRC32s release the GIL), in task order.
- joblib: worker processes on this machine (flowprep/pool.py: a dead worker's task runs again
  in a new process, up to `retries` times, and no other task notices).
- ray: a local Ray cluster of `workers` CPUs, or the existing one at `cluster.address`; a task
  whose worker or node dies runs again, up to `retries` times; the job gives up (NodesLost) when
  no node could run its tasks for `node_timeout` seconds (flowprep/distribute_ray.py).

The table of engines by name is flowprep/job.py's (DISTRIBUTORS).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator


log = logging.getLogger("flowprep")
Tasks = Iterable[tuple[Hashable, tuple]]


@dataclass
class TaskLost:
    """Why a task returned no result."""

    reason: str


@dataclass
class RayStats:
    """What the cluster did to a job, for its summary and manifest."""

    retried_tasks: int = 0     # finished tasks that ran more than once (their worker or node died)
    lost_nodes: list[dict] = field(default_factory=list)  # nodes that died while the job ran: id, ip, reason


@dataclass
class Cluster:
    """Where tasks run, beyond how many at once: what the process engines need (threads ignore it)."""

    store: Path | None = None          # Ray: its temporary folder under the store when short, its logs kept there
    address: str | None = None         # Ray: an existing cluster ('auto', 'ray://HOST:PORT')
    actors: Callable[[Any], list] | None = None  # Ray: ray -> actor handles, one appended to each task's args
    retries: int = 3                   # runs of a task after its worker died
    node_timeout: float = 600.0        # Ray: seconds without a node that can run the tasks before giving up
    report: Callable[[str], Any] = log.info  # Ray: what it waits for, a node lost
    stats: RayStats = field(default_factory=RayStats)
    logs: Path | None = None           # set when Ray's logs were kept (a worker died)


def run_threads(fn: Callable, tasks: Tasks, workers: int, cluster: Cluster) -> Iterator[tuple[Hashable, Any]]:
    """Threads of this process, results in task order."""
    tasks = list(tasks)
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = [(key, pool.submit(fn, *args)) for key, args in tasks]
        for key, future in futures:
            try:
                yield key, future.result()
            except Exception as e:  # noqa: BLE001 - the task's own failure: a result, not the job's
                yield key, TaskLost(f"{type(e).__name__}: {e}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_joblib(fn: Callable, tasks: Tasks, workers: int, cluster: Cluster) -> Iterator[tuple[Hashable, Any]]:
    """Worker processes on this machine (flowprep/pool.py), results as they finish."""
    from flowprep.pool import WorkerDied, run_tasks

    for key, result in run_tasks(fn, tasks, workers or local_cores(), retries=cluster.retries):
        if isinstance(result, WorkerDied):
            yield key, TaskLost(result.reason())
        elif isinstance(result, str):  # fn raised: a bug rather than bad input
            yield key, TaskLost(result)
        else:
            yield key, result


BACKENDS = ("ray", "joblib")  # the process engines `flowprep extract --backend` offers


def local_cores() -> int:
    """Cores this process may run on (the affinity mask: a cluster job's share, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

