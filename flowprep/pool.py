"""Worker processes on this machine that survive a worker's death: the joblib backend of `flowprep extract`.

joblib's pools (loky, multiprocessing) break as a whole when one worker dies (OOM killer, a
segfault in a codec, `kill`): every task in flight fails with TerminatedWorkerError and the job
ends without a summary. Here each worker is a process of its own (started with joblib's loky
context: fresh interpreters, no fork of the driver's threads, the main module not re-run), fed
one task at a time over a pipe, so the driver always knows which task a dead worker was running.
That task alone runs again in a new worker, up to `retries` times (as Ray's max_retries), then
comes back as a `WorkerDied` result; tasks on other workers never notice.

Idle workers are kept for the next `run_tasks` in this process (as loky's reusable executor
does), so a second job does not pay for starting interpreters and importing OpenCV again. They
keep the environment they were started with: pass what a task needs as its arguments.
"""
from __future__ import annotations

import atexit
import signal
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Iterable, Iterator


@dataclass
class WorkerDied:
    """A task whose worker process died on every attempt."""

    attempts: int
    exitcode: int | None

    def reason(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                how = f"killed by signal {-code}"
            if -code == signal.SIGKILL:
                how += ", e.g. by the out-of-memory killer"
        else:
            how = f"exit code {code}"
        return f"worker process died ({how}) on all {self.attempts} attempts"


def _die_with_parent() -> None:
    """Linux: end this worker when the driver dies (even by SIGKILL), so no orphan keeps writing the store."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass


def _serve(conn) -> None:
    """A worker: run (function, args) tasks until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _die_with_parent()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        except Exception as e:  # a task that cannot be unpickled here: its failure, not this worker's
            conn.send((False, f"cannot load the task in a worker: {type(e).__name__}: {e}"))
            continue
        if task is None:
            return
        fn, args = task
        try:
            conn.send((True, fn(*args)))
        except Exception as e:  # the task's own failure: a result, not a dead worker
            conn.send((False, f"{type(e).__name__}: {e}"))


_spare: list["_Worker"] = []  # idle workers kept between calls


@atexit.register
def _stop_spares() -> None:
    while _spare:
        _spare.pop().stop()


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple | None = None  # (key, args) it is running

    def stop(self, force: bool = False) -> None:
        if not force:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def run_tasks(fn: Callable, tasks: Iterable[tuple[Hashable, tuple]], workers: int, retries: int = 3
              ) -> Iterator[tuple[Hashable, Any]]:
    """Run `fn(*args)` for each (key, args) on `workers` processes; yield (key, result) as they finish.

    The result is what `fn` returned, the text of the exception it raised (str), or WorkerDied
    when its worker died on the first try and on each of `retries` more.
    """
    from joblib.externals.loky.backend.context import get_context

    ctx = get_context("loky")
    queue = iter(tasks)
    again: deque[tuple[Hashable, tuple]] = deque()  # tasks whose worker died, to run first
    attempts: dict[Hashable, int] = {}
    pool: list[_Worker] = []
    idle: list[_Worker] = []

    def next_task():
        return again.popleft() if again else next(queue, None)

    try:
        while True:
            # Keep every worker busy; start workers only as tasks need them.
            while True:
                if not idle and len(pool) >= workers:
                    break
                task = next_task()
                if task is None:
                    break
                w = idle.pop() if idle else None
                if w is None:
                    w = _spare.pop() if _spare else None
                    if w is None or not w.proc.is_alive():
                        if w is not None:
                            w.stop(force=True)
                        w = _Worker(ctx)
                    pool.append(w)
                w.task = task
                attempts[task[0]] = attempts.get(task[0], 0) + 1
                w.conn.send((fn, task[1]))
            busy = [w for w in pool if w.task is not None]
            if not busy:
                return
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for w in busy:
                if w.conn not in ready and w.proc.sentinel not in ready:
                    continue
                key, args = w.task
                if w.conn in ready:
                    try:
                        _, result = w.conn.recv()
                        w.task = None
                        idle.append(w)
                        yield key, result
                        continue
                    except (EOFError, OSError):
                        pass  # died before answering
                w.proc.join()
                code = w.proc.exitcode
                w.task = None
                w.conn.close()
                pool.remove(w)
                if attempts[key] <= retries:
                    again.append((key, args))
                else:
                    yield key, WorkerDied(attempts[key], code)
    finally:
        for w in pool:
            if w.task is None and w.proc.is_alive():
                _spare.append(w)  # for the next call
            else:
                w.stop(force=True)  # a task still running: the caller stopped early
