"""Distributors: run a function over many tasks, one function per engine, one signature.

    run(fn, tasks, workers, cluster) -> iterator of (key, result) as tasks finish

`tasks` are (key, args) pairs; a result is `fn(*args)`, or a `TaskLost` saying why a task could
not return one (its worker died on every attempt, or it raised: a bug, since store work turns
bad input into a record). Stopping the iteration early (a full disk, Ctrl-C) stops the workers.

- threads: this process (flowprep adopt: file reads and CRC32s release the GIL), in task order.
- joblib: worker processes on this machine (flowprep/pool.py: a dead worker's task runs again
  in a new process, up to `retries` times, and no other task notices).
- ray: a local Ray cluster of `workers` CPUs, or the existing one at `cluster.address`; a task
  whose worker dies (OOM kill, node lost) runs again, up to `retries` times. Ray's logs of a local
  cluster whose workers died are kept in <store>/.logs/ray.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from core.layout import LOGS

log = logging.getLogger("flowprep")
Tasks = Iterable[tuple[Hashable, tuple]]


@dataclass
class TaskLost:
    """Why a task returned no result."""

    reason: str


@dataclass
class Cluster:
    """Where tasks run, beyond how many at once: what the process engines need (threads ignore it)."""

    store: Path | None = None          # Ray: its temporary folder under the store when short, its logs kept there
    address: str | None = None         # Ray: an existing cluster ('auto', 'ray://HOST:PORT')
    actors: Callable[[Any], list] | None = None  # Ray: ray -> actor handles, one appended to each task's args
    retries: int = 3                   # runs of a task after its worker died
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


def _ray_temp_dir(store: Path) -> str:
    """Ray's session dir: under the store when short enough (unix socket paths are limited to
    about 107 bytes and Ray appends about 62), else a fresh folder in /tmp."""
    d = store.resolve() / ".tmp.ray"  # a .tmp. name: skipped by store walks, removed with the temporaries
    if len(str(d)) <= 40:
        return str(d)
    return tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")


def _keep_ray_logs(temp_dir: str, dest: Path) -> None:
    """Move the session logs of a local cluster out of its temporary folder (deleted next) to
    `dest`, keeping their paths below it (session_*/logs/...), so paths in messages stay valid."""
    shutil.rmtree(dest, ignore_errors=True)
    for session in sorted(Path(temp_dir).glob("session_*")):
        if session.is_dir() and not session.is_symlink() and (session / "logs").is_dir():
            (dest / session.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(session / "logs"), str(dest / session.name / "logs"))


def run_ray(fn: Callable, tasks: Tasks, workers: int, cluster: Cluster) -> Iterator[tuple[Hashable, Any]]:
    """Ray tasks, results as they finish; `cluster.logs` is set when a local cluster's logs were kept."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    own = not ray.is_initialized()
    temp_dir = None
    logs = cluster.store / LOGS / "ray" if cluster.store else None
    crashed = False
    if own:
        common = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if cluster.address:
            ray.init(address=cluster.address, **common)
        else:
            temp_dir = _ray_temp_dir(cluster.store) if cluster.store else None
            ray.init(num_cpus=workers, _temp_dir=temp_dir, **common)
    try:
        if not workers:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors = cluster.actors(ray) if cluster.actors else []
        # max_retries: a task whose worker process dies (OOM kill, node loss) runs again from scratch;
        # retry_exceptions=False: the task's own exceptions are its result, not a reason to run again.
        remote = ray.remote(num_cpus=1, max_retries=cluster.retries, retry_exceptions=False)(fn)
        queue = iter(tasks)
        inflight: dict = {}
        submitted = 0

        def submit() -> None:
            nonlocal submitted
            for key, args in queue:
                extra = (actors[submitted % len(actors)],) if actors else ()
                inflight[remote.remote(*args, *extra)] = key
                submitted += 1
                return

        # Bounded in-flight, so the driver never queues the whole dataset. On a cluster we started,
        # num_cpus=workers already caps concurrency and a second task per worker hides scheduling
        # latency; on a shared cluster the in-flight count is what keeps us to `workers` cores.
        for _ in range(2 * workers if own and not cluster.address else workers):
            submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                key = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # fn raised
                    result = TaskLost(str(e.cause) if e.cause else str(e))
                except Exception as e:  # the worker died on every retry
                    crashed = True
                    text = f"{type(e).__name__}: {e}".strip()
                    if temp_dir and logs:  # the logs move to the store when the cluster stops: name them there
                        text = text.replace(str(Path(temp_dir).resolve()), str(logs)).replace(temp_dir, str(logs))
                        where = f"Ray's logs: {logs}"
                    else:
                        where = "Ray's logs are on the cluster's nodes (/tmp/ray/session_latest/logs by default)"
                    result = TaskLost(f"worker died on all {cluster.retries + 1} attempts ({text.splitlines()[0]}); "
                                      f"{where}")
                submit()
                yield key, result
    finally:
        if own:
            ray.shutdown()
            if temp_dir:
                if crashed and logs:
                    try:
                        _keep_ray_logs(temp_dir, logs)
                        cluster.logs = logs
                    except OSError as e:
                        log.warning(f"could not keep Ray's logs in {logs}: {e}")
                shutil.rmtree(temp_dir, ignore_errors=True)


DISTRIBUTORS: dict[str, Callable[..., Iterator]] = {"ray": run_ray, "joblib": run_joblib, "threads": run_threads}
BACKENDS = ("ray", "joblib")  # the process engines `flowprep extract --backend` offers


def local_cores() -> int:
    """Cores this process may run on (the affinity mask: a cluster job's share, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

