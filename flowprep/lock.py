"""One job at a time per store: the lock file OUT/.flowprep.lock.

Two jobs on one store undo each other: each clears the other's temporary copies at start, both
rewrite the list files. So `flowprep extract` and `flowprep verify` hold this lock while they run,
and a second job refuses to start, naming the holder.

The lock is a small JSON file (host, pid, process start time, boot id, start time, command, a
random token) written whole under a temporary name and then hard-linked to the lock name:
link(2) fails if the name exists and is atomic on local filesystems and on NFS (the classic
NFS-safe lock file; O_CREAT|O_EXCL, the fallback where links are not supported, is atomic on
NFSv3 and later too). Readers never see half a lock.

A lock outlives a killed job (SIGKILL, OOM, a node lost). Whether its holder still runs can
only be told on the holder's own host: on the same host, a lock whose pid is gone (or whose pid
now belongs to a younger process, or that dates from before the last boot) is stale and is
taken over, with a note. A lock from another host is never broken automatically, as the other
host may be running the job right now: the error names the host, pid, start time and command,
and says to remove the file once that job is known to be gone (`rm OUT/.flowprep.lock`).
Removing a lock of a job that does run lets two jobs write the store at once.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path

from core.atomic import temp_name
from core.layout import LOCK


class StoreLocked(RuntimeError):
    """The store is held by another job; the message names it and says what to do."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (Linux): state, ..., start time (index 19); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after the name in parentheses, which may hold spaces


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks after boot, to tell a reused pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(holder: dict) -> bool:
    """Whether the process holding a lock on this host still runs."""
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    started, now = holder.get("pid_start"), fields[19] if fields else None
    return not (started and now and started != now)  # same pid, other process: the holder is gone


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command') or '?'}")


def read_lock(root: str | Path) -> dict | None:
    """The holder of a store's lock, or None when it is free."""
    try:
        return json.loads((Path(root) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {"host": "?", "pid": None, "started": "?", "command": "(unreadable lock file)", "unreadable": True}


class StoreLock:
    """`with StoreLock(root, "flowprep extract ...") as lock:`; `lock.note` says if a stale lock was taken over.

    Raises StoreLocked when another job holds the store.
    """

    def __init__(self, root: str | Path, command: str | None = None):
        self.path = Path(root) / LOCK
        self.command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.note: str | None = None
        self.held = False
        self.token = uuid.uuid4().hex

    def _content(self) -> str:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "boot_id": _boot_id(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": self.command, "token": self.token}, indent=1) + "\n"

    def _create(self, content: str) -> bool:
        """Create the lock file whole, unless it exists; True when we made it."""
        tmp = temp_name(self.path)
        tmp.write_text(content)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE / SMB mounts): exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(content)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> "StoreLock":
        content = self._content()
        for _ in range(20):
            if self._create(content):
                self.held = True
                return self
            holder = read_lock(self.path.parent)
            if holder is None:
                continue  # released meanwhile
            if holder.get("unreadable"):
                time.sleep(0.1)  # being written by the fallback path; look again
                holder = read_lock(self.path.parent)
                if holder is None or holder.get("unreadable"):
                    raise StoreLocked(f"the store {self.path.parent} has a lock file {self.path} that cannot be "
                                      f"read; if no flowprep job is running on this store, remove it: "
                                      f"rm {shlex.quote(str(self.path))}")
            here = holder.get("host") == socket.gethostname()
            if here and holder.get("pid") == os.getpid() and holder.get("token") != self.token:
                raise StoreLocked(f"the store {self.path.parent} is already in use by this process ({describe(holder)})")
            if not here:
                raise StoreLocked(
                    f"the store {self.path.parent} is in use by another flowprep job ({describe(holder)}). "
                    f"That host's processes cannot be checked from here ({socket.gethostname()}). Wait for it to "
                    f"finish; if it is no longer running (the job was killed or the node lost), remove the lock: "
                    f"rm {shlex.quote(str(self.path))}")
            if _alive(holder):
                raise StoreLocked(f"the store {self.path.parent} is in use by another flowprep job "
                                  f"({describe(holder)}); wait for it to finish, or stop it (kill {holder['pid']}) "
                                  "and run again")
            if self._take_over(holder):
                self.note = f"took over the stale lock of a job that is no longer running ({describe(holder)})"
        raise StoreLocked(f"could not lock the store {self.path.parent}: {self.path} keeps changing; "
                          "is another job starting on it?")

    def _take_over(self, stale: dict) -> bool:
        """Remove a stale lock, unless another job replaced it meanwhile."""
        grave = temp_name(self.path, "stale.")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(grave.read_text())
        except (OSError, json.JSONDecodeError):
            moved = None
        if moved is not None and moved != stale:
            # Another job took the stale lock over first and we moved its live lock: put it back.
            try:
                os.link(grave, self.path)
            except OSError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.path.parent)
        if holder and holder.get("token") == self.token:  # never remove a lock that is not ours
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
