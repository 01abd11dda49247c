"""A real multi-node Ray cluster on this host, for the tests of a job that loses a node.

Each node is a `ray start --block` in a session of its own, so that losing one is "stop its whole
process tree at once, then SIGKILL it" (ray start, raylet, agents, log monitor and the raylet's
worker processes, which sit in process groups of their own), as a machine that dies. The head has
no CPUs: tasks can only run on worker nodes. The head's GCS checks nodes every second and marks one
dead after 3 missed checks (Ray's defaults take ~15 s). Nothing here calls `ray stop`, which would
stop every Ray on the host: `stop` kills the process trees it started, by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
DETECT_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (killed processes re-parented to init may stay zombies for a while)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class RayNodes:
    """`head()`, then `worker(name)` nodes; `kill(name)` loses one; `stop()` ends them all."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: socket paths < 108 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **DETECT_ENV}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.pids: set[int] = set()  # every process of ours seen, to check that none outlives the test

    def _start(self, name: str, args: list[str]) -> None:
        log = self.dir / f"{name}.log"
        with open(log, "w") as out:
            p = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                 "--temp-dir", str(self.dir / name), "--dashboard-agent-listen-port", str(_free_port()), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.nodes[name] = p
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard=false",
                             "--dashboard-port", str(_free_port())])

    def worker(self, name: str, cpus: int = 2) -> None:
        self._start(name, ["--address", self.address, "--num-cpus", str(cpus)])

    def kill(self, name: str) -> None:
        """Lose a node as a machine dies: freeze its whole process tree, then SIGKILL it."""
        p = self.nodes[name]
        pids = _tree(p.pid)
        self.pids.update(pids)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        p.wait()

    def stop(self) -> None:
        for name in list(self.nodes):
            if self.nodes[name].poll() is None:
                self.kill(name)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in self.pids if _running(pid)]
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not left, f"Ray processes outlived the test: {left}"
