"""The Ray distributor (flowprep/distribute.py's `run`, for Ray): tasks on a local cluster of
`workers` CPUs, or on the cluster at `cluster.address`, a bounded number in flight.

Ray retries a task whose worker process or node dies (max_retries); its result then comes back as
usual and `stats` counts the retry (the task reads its own attempt number and returns it with its
result). What Ray does not do is give up: when no alive node has CPUs, its tasks wait for one
forever. So while no result arrives the driver looks at the cluster (ray.nodes() and
ray.available_resources(): ~1-2 ms, at most every _LOOK_S seconds and only while waiting; once a
minute otherwise, to tell of a lost node early), says what it waits for, and after
`cluster.node_timeout` seconds in which no alive node could run the tasks (none has CPUs, or CPUs
are free while our tasks do not start) cancels what is in flight and raises NodesLost. While all
CPUs are busy it only reports: long tasks and busy shared clusters are no reason to give up.

Ray's own lines about dead workers and retried tasks (printed by a thread of Ray's driver even with
log_to_driver=False) come through `cluster.report` as one short line each, with repeats counted.
The attempt number and that print hook are private APIs of ray 2.60 (the public runtime context has
no attempt); without them the job runs the same, and counts retries as unknown.
"""
from __future__ import annotations

import logging
import os
import queue as _queue
import re
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from core.layout import LOGS
from flowprep.distribute import Cluster, TaskLost

log = logging.getLogger("flowprep")

_POLL_S = 2.0           # ray.wait timeout: how soon the driver notices that nothing finishes
_LOOK_S = 2.0           # the least time between two looks at the cluster while waiting
_LOOK_BUSY_S = 60.0     # ... and while results come in
_REPORT_FIRST_S = 15.0  # say what we wait for after this long without a result (at once when stuck)
_REPORT_EVERY_S = 30.0  # ... then this often


class NodesLost(RuntimeError):
    """No alive node could run the remaining tasks for `node_timeout` seconds (in-flight tasks
    were cancelled; the caller keeps what finished)."""


def _attempt_number() -> int | None:
    """In a task: how many times Ray ran it before (0 on the first run). Private API of ray 2.60."""
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - another Ray: retries count as unknown
        return None


def _with_attempt(fn: Callable) -> Callable:
    """fn, returning (result, attempt number): what Ray runs."""
    def run(*args):
        return fn(*args), _attempt_number()
    run.__name__ = run.__qualname__ = getattr(fn, "__name__", "task")  # Ray's messages name the task by it
    return run


def _lost_reason(e: Exception, attempts: int) -> str:
    import ray.exceptions as rex

    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, rex.NodeDiedError):
        how = "the node it ran on died"
    elif isinstance(e, rex.OutOfMemoryError):
        how = "Ray's memory monitor killed its worker (the node ran out of memory)"
    elif isinstance(e, rex.WorkerCrashedError):
        how = "its worker process died (killed, e.g. by the out-of-memory killer, or crashed)"
    else:
        how = type(e).__name__
    return f"{how}, on all {attempts} attempts ({type(e).__name__}: {first})"


_CUT = re.compile(r" (?:To troubleshoot|Error:|This can happen|To see|Some common causes|Last \d+ lines|Check )")


def _condense(text: str) -> str:
    """One line of one of Ray's messages ("Task f failed. There are 3 retries remaining, ...")."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", (text.strip().splitlines() or [""])[0])
    line = _CUT.split(line, 1)[0].strip()
    return line if len(line) <= 240 else line[:237] + "..."


@contextmanager
def _ray_messages_to(sink: "_queue.SimpleQueue[str]"):
    """While inside: the messages Ray's driver prints from its error channel go to `sink`, one
    short line each (in full to the ray.errors logger at DEBUG). Private hook of ray 2.60."""
    try:
        from ray._private import worker as rw

        original = rw.print_to_stdstream
    except (ImportError, AttributeError):
        yield
        return
    full = logging.getLogger("ray.errors")

    def route(data, ignore_prefix):
        if data.get("pid") != "raylet":  # task output and the autoscaler's: as Ray does
            return original(data, ignore_prefix)
        for text in data.get("lines", []):
            full.debug("%s", text)
            sink.put(_condense(str(text)))

    rw.print_to_stdstream = route
    try:
        yield
    finally:
        if rw.print_to_stdstream is route:
            rw.print_to_stdstream = original


def _n(count: float, word: str) -> str:
    return f"{count:g} {word}" + ("" if count == 1 else "s")


class _Watch:
    """Nodes alive and lost, CPUs total and free, as the driver sees them: refreshed by look()."""

    def __init__(self, ray, stats, report):
        self.ray, self.stats, self.report = ray, stats, report
        self.dead_at_start = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        self.alive = self.cpu_nodes = 0
        self.cpus = self.free = 0.0
        self.at = 0.0

    def look(self) -> None:
        nodes = self.ray.nodes()
        alive = [n for n in nodes if n["Alive"]]
        self.alive = len(alive)
        self.cpu_nodes = sum(1 for n in alive if n.get("Resources", {}).get("CPU", 0) >= 1)
        self.cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
        self.free = self.ray.available_resources().get("CPU", 0.0) if self.cpus else 0.0
        self.at = time.monotonic()
        for n in nodes:
            nid = n["NodeID"]
            if not n["Alive"] and nid not in self.dead_at_start and nid not in {x["id"] for x in self.stats.lost_nodes}:
                lost = {"id": nid, "ip": n.get("NodeManagerAddress", "?"),
                        "reason": n.get("DeathReasonMessage") or "no reason given"}
                self.stats.lost_nodes.append(lost)
                where = (f"on the {_n(self.cpus, 'CPU')} of the {_n(self.cpu_nodes, 'node')} left"
                         if self.cpu_nodes else "when a node with CPUs joins: none is alive now")
                self.report(f"ray: lost node {nid[:12]} at {lost['ip']} ({lost['reason']}); its tasks run again {where}")

    def describe(self) -> str:
        return f"{_n(self.alive, 'alive node')}, {self.cpu_nodes:g} with CPUs ({_n(self.cpus, 'CPU')}, {self.free:g} free)"

    def lost(self) -> str:
        lost = self.stats.lost_nodes
        if not lost:
            return "no node was lost during this job"
        return (f"{_n(len(lost), 'node')} lost during this job: "
                + "; ".join(f"{x['id'][:12]} at {x['ip']} ({x['reason']})" for x in lost))


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


def run_ray(fn: Callable, tasks, workers: int, cluster: Cluster) -> Iterator[tuple[Hashable, Any]]:
    """Ray tasks, results as they finish (module docstring). `cluster` (distribute.Cluster): where
    (address, or a local cluster with its temporary folder and kept logs under `store`), actors
    appended to the tasks, retries, node_timeout, report and the stats it keeps up to date."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    said: _queue.SimpleQueue[str] = _queue.SimpleQueue()

    def tell_ray_messages() -> None:
        lines = []
        while not said.empty():
            lines.append(said.get())
        for line, count in Counter(lines).items():  # Ray's own deduplication is bypassed: do it here
            cluster.report(f"ray says{f' ({count}x)' if count > 1 else ''}: {line}")

    st, report = cluster.stats, cluster.report
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
    inflight: dict = {}  # ObjectRef -> key
    finished = False
    watch = None
    with _ray_messages_to(said):
        try:
            watch = _Watch(ray, st, report)
            watch.look()
            if not workers:
                workers = max(1, int(watch.cpus or 1))
            actors = cluster.actors(ray) if cluster.actors else []
            # max_retries: a task whose worker process or node dies runs again from scratch;
            # retry_exceptions=False: the task's own exceptions are its result, not a reason to run again.
            task = ray.remote(num_cpus=1, max_retries=cluster.retries, retry_exceptions=False)(_with_attempt(fn))
            queue = iter(tasks)
            more, submitted, done = True, 0, 0
            # Bounded in-flight, so the driver never queues the whole dataset. On a cluster we started,
            # num_cpus=workers already caps concurrency and a second task per worker hides scheduling
            # latency; on a shared cluster the in-flight count is what keeps us to `workers` cores.
            limit = 2 * workers if own and not cluster.address else workers
            last_result = time.monotonic()
            stuck_since: float | None = None  # since when no alive node could run our tasks
            stuck_why = ""
            next_report = last_result + _REPORT_FIRST_S
            while True:
                while more and len(inflight) < limit:
                    item = next(queue, None)
                    if item is None:
                        more = False
                        break
                    key, args = item
                    extra = (actors[submitted % len(actors)],) if actors else ()
                    inflight[task.remote(*args, *extra)] = key
                    submitted += 1
                if not inflight:
                    finished = True
                    return
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
                tell_ray_messages()
                now = time.monotonic()
                for ref in ready:
                    key = inflight.pop(ref)
                    try:
                        result, attempt = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # fn raised: its own failure, not retried
                        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                        result, attempt = TaskLost(f"{type(cause).__name__}: {cause}"), 0
                    except ray.exceptions.RayError as e:  # its worker or node died on every attempt
                        crashed = True
                        text = _lost_reason(e, cluster.retries + 1)
                        if temp_dir and logs:  # the logs move to the store when the cluster stops: name them there
                            text = text.replace(str(Path(temp_dir).resolve()), str(logs)).replace(temp_dir, str(logs))
                            where = f"Ray's logs: {logs}"
                        else:
                            where = "Ray's logs are on the cluster's nodes (/tmp/ray/session_latest/logs by default)"
                        result, attempt = TaskLost(f"{text}; {where}"), 0
                    if attempt:   # None: Ray did not say (counted as a first attempt)
                        st.retried_tasks += 1
                    done += 1
                    last_result, stuck_since, next_report = now, None, now + _REPORT_FIRST_S
                    yield key, result
                if ready:
                    if now - watch.at >= _LOOK_BUSY_S:
                        watch.look()
                    continue
                # Nothing finished for _POLL_S: look at the cluster (at most every _LOOK_S).
                if now - watch.at < _LOOK_S:
                    continue
                watch.look()
                used = max(0.0, watch.cpus - watch.free)
                if watch.cpus < 1:
                    why = "no alive node has CPUs"
                elif watch.free >= 1 and len(inflight) > used:
                    why = (f"{watch.free:g} CPUs are free but {len(inflight) - used:g} of our tasks do not start (Ray "
                           "may be waiting on a node that died and that it has not marked dead yet, or the nodes "
                           "cannot start workers: see their raylet logs)")
                else:
                    why = ""  # consistent with our tasks running (long ones, or a shared busy cluster)
                if not why:
                    stuck_since = None
                elif stuck_since is None:
                    stuck_since, stuck_why, next_report = now, why, now  # say so at once
                else:
                    stuck_why = why
                left = len(inflight)
                if stuck_since is not None and now - stuck_since >= cluster.node_timeout:
                    raise NodesLost(
                        f"no Ray node could run the remaining videos for {now - stuck_since:.0f} s (--node-timeout "
                        f"{cluster.node_timeout:g}): {stuck_why}; {watch.lost()}; now {watch.describe()}. {done} "
                        f"finished, {left} in flight cancelled; last result {now - last_result:.0f} s ago. Bring the "
                        "lost node(s) back or add nodes (ray start --address <head>), then run the same command "
                        "again: finished videos are kept. Or raise --node-timeout to wait longer")
                if now >= next_report:
                    next_report = now + _REPORT_EVERY_S
                    running = min(left, int(used))
                    msg = (f"ray: no result for {now - last_result:.0f} s; {left} tasks in flight, about {running} "
                           f"running and {left - running} waiting; {watch.describe()}; {watch.lost()}")
                    if st.retried_tasks:
                        msg += f"; {st.retried_tasks} finished tasks ran more than once"
                    if stuck_since is not None:
                        msg += (f". Waiting because {stuck_why}: giving up in "
                                f"{max(0.0, cluster.node_timeout - (now - stuck_since)):.0f} s unless a node with "
                                "CPUs joins")
                    report(msg)
        finally:
            if inflight and not finished:  # stopped early (NodesLost, Ctrl-C, a full disk)
                for ref in inflight:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            try:
                if watch is not None and ray.is_initialized():
                    watch.look()  # count the nodes lost since the last look
            except Exception:  # noqa: BLE001 - the cluster is going away: the counts so far stand
                pass
            tell_ray_messages()
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
