"""The JPEG store format: one folder per video, one JPEG per frame (denseflow / MMAction2 layout,
readable as-is by TSN-style loaders)::

    OUT/<class>/<video>/img_00001.jpg ...            RGB frames, 1-based
    OUT/<class>/<video>/flow_x_00001.jpg ...         n frames give n-1 flows
    OUT/<class>/<video>/flow_y_00001.jpg ...
    OUT/<class>/<video>/bflow_x_00001.jpg ...        backward flows (frame i+1 to i), with --direction both
    OUT/<class>/<video>/meta.json                    per-video attributes, written last: what makes it count

Checksums are in meta.json ("crc32": per kind, 8 hex digits per frame in order).

A video is written into a temporary folder (`.tmp.*`) and renamed into place whole
(`commit_folder`). Backward flows added to a finished video (`BackwardWriter`) go into a
temporary folder inside the video folder, are moved into place, and meta.json (rewritten
atomically, last) is what makes them count: until then meta says bflows 0, and a folder holding
bflow files that meta does not count fails `Store.check`. The forward files are never opened for
writing.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from core.atomic import temp_name, write_json
from core import layout
from core.layout import FLOW_KINDS, KINDS, META, frame_name
from flowprep.store_base import (StoreError, VideoReader, VideoWriter, WholeOrNothing, checked_id, crc_hex, crc_list,
                                 encode_jpeg)

NAME = "jpeg"
FLOW_CODECS = ("jpeg",)
MMACTION2 = layout.MMACTION2  # a store in this format is an MMAction2 rawframes root


def path(root: str | Path, video_id: str) -> Path:
    """The video's folder."""
    return Path(root) / checked_id(video_id)


def read_meta(meta_path: Path, video_id: str) -> dict:
    try:
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{meta_path} of video {video_id} is damaged (not JSON: {e}); `flowprep extract` "
                         "redoes it") from None


def commit_folder(tmp: Path, final: Path, meta: dict) -> Path:
    """Put a video folder written under the temporary name `tmp` in place as `final`, its
    meta.json written last inside it (what makes the video count). A redo swaps the old copy
    out before removing it; a file or link at `final` is not ours and is refused."""
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if final.is_symlink() or final.is_file():
        # Not a copy of ours (ids are checked, so this is inside the store): refuse to replace it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"{final} is in the way of video {meta.get('id', final.name)}: "
                         "not a video folder; move it out of the store")
    if final.exists():
        old = temp_name(final, "old.")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


class Writer(VideoWriter):
    """Writes one video's frames into a temporary folder; `commit` renames it into place."""

    format = NAME

    def __init__(self, root: str | Path, video_id: str, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
        if flow_codec != "jpeg":
            raise ValueError("flow_codec 'raw' needs the hdf5 format: a JPEG store is one JPEG file per frame")
        super().__init__(jpeg_quality, "jpeg")
        self.final = path(root, video_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.final)
        self.tmp.mkdir()
        self.crc: dict[str, list[int]] = {k: [] for k in KINDS}

    def _put(self, kind: str, data: bytes) -> None:
        (self.tmp / frame_name(kind, len(self.crc[kind]))).write_bytes(data)
        self.crc[kind].append(zlib.crc32(data))

    def _finish(self, meta: dict) -> Path:
        meta["crc32"] = {k: crc_hex(v) for k, v in self.crc.items() if v or k in ("img", "flow_x", "flow_y")}
        return commit_folder(self.tmp, self.final, meta)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class BackwardWriter(WholeOrNothing):
    """Adds backward flows to a finished video: `write_flow(q)` per flow, then `commit(meta changes)`
    (module docstring: files into a temporary folder inside it, then meta.json rewritten last)."""

    def __init__(self, root: str | Path, video_id: str):
        self.final = path(root, video_id)
        self.meta = read_meta(self.final / META, video_id)
        self.quality = int(self.meta.get("jpeg_quality", 95))
        self.tmp = temp_name(self.final / "bflow")
        self.tmp.mkdir()
        self.bflows = 0
        self.crc: dict[str, list[int]] = {"bflow_x": [], "bflow_y": []}

    def write_flow(self, q: np.ndarray, backward: bool = True) -> None:
        for c, kind in enumerate(FLOW_KINDS[True]):
            data = encode_jpeg(q[..., c], self.quality)
            (self.tmp / frame_name(kind, self.bflows)).write_bytes(data)
            self.crc[kind].append(zlib.crc32(data))
        self.bflows += 1

    def commit(self, changes: dict) -> Path:
        for entry in sorted(os.listdir(self.tmp)):
            os.replace(self.tmp / entry, self.final / entry)
        self.tmp.rmdir()
        crc = dict(self.meta.get("crc32") or {}, **{k: crc_hex(v) for k, v in self.crc.items()})
        write_json(self.final / META, dict(self.meta, **changes, bflows=self.bflows, crc32=crc))
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def count_files(folder: Path) -> dict[str, int]:
    """File counts per kind (img, flow_x, ...) in a video folder."""
    counts = dict.fromkeys(KINDS, 0)
    for entry in os.scandir(folder):
        kind = entry.name.rpartition("_")[0]
        if kind in counts and entry.name.endswith(".jpg"):
            counts[kind] += 1
    return counts


class Reader(VideoReader):
    def __init__(self, root: str | Path, video_id: str):
        folder = path(root, video_id)
        meta_path = folder / META
        if not meta_path.is_file():
            raise StoreError(f"video {video_id} is not in the store {root} (no {meta_path})")
        super().__init__(video_id, folder, read_meta(meta_path, video_id))

    def _bytes(self, kind: str, i: int) -> bytes:
        return (self.path / frame_name(kind, i)).read_bytes()

    def checksums(self) -> dict[str, list[int]] | None:
        crc = self.meta.get("crc32")
        return None if crc is None else {k: crc_list(v) for k, v in crc.items()}

    def count_problem(self, expected: dict[str, int]) -> str | None:
        counts = count_files(self.path)
        if tuple(counts[k] for k in expected) == tuple(expected.values()):
            return None
        return (f"meta.json says {self.count('img')} images / {self.num_flows} flows / {self.num_bflows} backward "
                "flows but the folder holds " + ", ".join(f"{n} {k}" for k, n in counts.items()) + " files")


def video_ids(root: Path) -> list[str]:
    """Ids of the video folders (those with a meta.json) under `root`."""
    ids = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Dot names (.tmp.*, .logs, the lock) are the store's own; ids never have them.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        if META in filenames and rel != Path("."):
            ids.append(rel.as_posix())
            dirnames[:] = []
    return ids
