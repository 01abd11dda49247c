"""Atomic file writes: the one way every file of a store, a run or a report is written.

A file is written under a temporary name in its own folder (`.tmp.<random>.<name>`, so it
keeps its suffix for writers that insist on one: np.savez, cv2.VideoWriter, h5py), flushed to
disk, then renamed over the final name. Readers see the old file or the whole new one, never
half of one; a kill leaves only a `.tmp.*` file, which `remove_temps` clears and every store
or run walk skips.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

TMP_PREFIX = ".tmp."


# File systems hold names of at most 255 bytes; a temporary name must fit whenever the final one does.
NAME_MAX = 255


def temp_name(path: str | Path, tag: str = "") -> Path:
    """A fresh temporary name beside `path` that keeps its suffix (and says what it is for). A
    long final name (up to the file system's 255 bytes) is not repeated in it but hashed, so the
    temporary name is never the one that is too long."""
    path = Path(path)
    name = f"{TMP_PREFIX}{tag}{uuid.uuid4().hex[:12]}.{path.name}"
    if len(name.encode()) > NAME_MAX:
        digest = hashlib.sha1(path.name.encode()).hexdigest()[:12]
        name = f"{TMP_PREFIX}{tag}{uuid.uuid4().hex[:12]}.{digest}{path.suffix[-16:]}"
    return path.with_name(name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; it replaces `path` when the block ends
    without error, and is removed when it raises (or the process is interrupted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented JSON with sorted keys (so equal content gives equal bytes), atomically."""
    return write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_atomic(path: str | Path, save: Callable[[Path], object]) -> Path:
    """`save(tmp_path)` (torch.save, np.savez, ...) written atomically to `path`."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def remove_temps(root: str | Path, recursive: bool = True) -> int:
    """Remove `.tmp.*` leftovers of killed writes under `root`; returns how many.

    Only call when nothing is writing there (a store under its lock, a run at start).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
                n += 1
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                (Path(dirpath) / name).unlink(missing_ok=True)
                n += 1
        if not recursive:
            break
    return n
