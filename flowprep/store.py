"""Frame and flow stores: the layouts `flowprep extract` writes and the trainer reads, by format.

A store is a folder: its own files (store.json, manifest.jsonl, expected.json, verify.json:
flowprep/store_files.py; list files: flowprep/lists.py) and one entry per video, in one of two
formats, each one module behind the same writer and reader (flowprep/store_base.py):

    jpeg   OUT/<class>/<video>/img_00001.jpg, flow_x_00001.jpg, ... (flowprep/store_jpeg.py)
    hdf5   OUT/<class>/<video>.h5 (flowprep/store_hdf5.py)

This module picks the format (FORMATS) and holds what does not depend on it: `Store` (open a
video, check it is whole, list the videos). Nothing outside the format modules branches on a
format's name. Adding a format is a module with NAME, FLOW_CODECS, MMACTION2, path, Writer, BackwardWriter,
Reader and video_ids, and its entry in FORMATS (and its name in core/layout.py).

In every format, n frames give n - 1 flows. With `--no-rgb` a video keeps only its flow: meta
"rgb" is false, no RGB frames, and "frames" still counts the decoded frames, so flows = frames - 1
holds in every store. Every stored frame has a checksum: the CRC32 of its stored bytes (the JPEG;
for raw flow the HxW plane, row-major), taken as it is written. A decoder accepts a JPEG with
bytes changed in place (it just shows the wrong picture), so only the checksum finds such damage;
`flowprep verify` checks every one. The cheap `Store.check` (resume, training) compares counts only.

Names starting with "." are the store's own and never a video: `.tmp.*` (writes in progress),
`.flowprep.lock` (the job holding the store), `.logs/` (Ray's logs of a job whose workers died).
A video is written under a temporary name and renamed into place when whole, so an interrupted
job never leaves a half video that looks complete. Backward flows added to a finished video
(`extract --direction both` on a forward store) never touch its forward frames.

A store whose store.json says direction "both" requires backward flows of every video
(`Store.check`); stores written before `direction` and `flow_codec` existed read as "forward"
and "jpeg".
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from core.layout import FLOW_CODECS, KINDS
from flowprep import store_hdf5, store_jpeg
from flowprep.store_base import StoreError, VideoReader
from flowprep.store_files import read_findings, read_store_info, store_direction

FORMATS = {m.NAME: m for m in (store_jpeg, store_hdf5)}


def get_format(name: str):
    """The module of a store format, or ValueError naming the formats there are."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"store format must be one of {tuple(FORMATS)}, got {name!r}") from None


def video_path(root: str | Path, video_id: str, fmt: str) -> Path:
    """Final location of a video in the store (a folder, a file): refuses ids that are not clean
    relative paths, so nothing outside the store is ever written, replaced or removed through one."""
    return get_format(fmt).path(root, video_id)


def open_writer(fmt: str, root: str | Path, video_id: str, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
    """A writer for one video: `write_rgb`, `write_flow`, then `commit(meta)` (or `abort`).

    flow_codec: "jpeg", or "raw" (HDF5 only): uncompressed uint8 flow planes, lossless and fastest to read.
    """
    f = get_format(fmt)
    if flow_codec not in FLOW_CODECS:
        raise ValueError(f"flow_codec must be one of {FLOW_CODECS}, got {flow_codec!r}")
    return f.Writer(root, video_id, jpeg_quality, flow_codec)


def open_backward_writer(fmt: str, root: str | Path, video_id: str):
    """A writer adding backward flows to a finished video: `write_flow(q)` per flow (frame i+1 to
    frame i, in order), then `commit(meta changes)` (or `abort`); the forward frames are left as
    they are. Same codec and JPEG quality as the video's forward flows."""
    return get_format(fmt).BackwardWriter(root, video_id)


class Inspection(NamedTuple):
    """What `Store.inspect` found: the reason a video is not whole (None: it is), and what it read."""
    problem: str | None
    meta: dict = {}
    bflows: int = 0


class Store:
    """A store on disk. `Store(root)` reads OUT/store.json to learn the format, and OUT/verify.json:
    `check` rejects the videos the last `flowprep verify` found damaged (unless `findings=False`,
    as verify itself, which looks afresh), so neither a resume nor training trusts them."""

    def __init__(self, root: str | Path, *, findings: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"store {self.root} does not exist; run `flowprep extract --videos DIR --out {self.root}` first")
        self.info = read_store_info(self.root)
        self.format = self.info["format"]
        self._format = get_format(self.format)
        self.direction = store_direction(self.info)
        self.findings = read_findings(self.root) if findings else {}
        self.mmaction2 = self._format.MMACTION2  # MMAction2's settings for this layout (None: not a rawframes root)

    def open(self, video_id: str) -> VideoReader:
        return self._format.Reader(self.root, video_id)

    def path(self, video_id: str) -> Path:
        return self._format.path(self.root, video_id)

    def check(self, video_id: str, backward: bool | None = None) -> str | None:
        """Cheap completeness check (no decoding): None when whole, else the reason.

        Used to skip finished videos on resume and to reject incomplete ones before training;
        `flowprep verify` goes further: every frame's checksum, and a decode.
        backward: require backward flows (default: when the store's direction is "both");
        False checks the forward part only, ignoring backward files (is it ready to gain them?).
        """
        return self.inspect(video_id, backward).problem

    def inspect(self, video_id: str, backward: bool | None = None) -> Inspection:
        """`check`'s answer with what the one opening of the video read: its meta and backward
        flow count (for a resume to compare the source's fingerprint without opening it again)."""
        if video_id in self.findings:
            return Inspection(f"flagged by flowprep verify: {self.findings[video_id]}; `flowprep extract` redoes it")
        need = self.direction == "both" if backward is None else backward
        try:
            with self.open(video_id) as v:
                seen = Inspection(None, v.meta, v.num_bflows)
                if not v.meta.get("complete"):
                    return seen._replace(problem="not marked complete")
                if v.num_frames < 2 or v.num_flows != v.num_frames - 1:
                    return seen._replace(problem=f"{v.num_frames} frames but {v.num_flows} flows (expected frames - 1)")
                if v.num_bflows not in (0, v.num_flows):
                    return seen._replace(problem=f"{v.num_flows} forward but {v.num_bflows} backward flows")
                if need and v.num_bflows != v.num_flows:
                    return seen._replace(problem="no backward flows, and the store is --direction both; `flowprep "
                                                 "extract --direction both` adds them")
                bflows = v.num_bflows if backward is not False else 0
                extra = v.meta.get("extra_files") or {}  # adopted in place: source files past the stored range
                counts = (v.count("img"), v.num_flows, v.num_flows, bflows, bflows)
                kinds = KINDS if backward is not False else KINDS[:3]
                return seen._replace(problem=v.count_problem({k: n + int(extra.get(k, 0))
                                                              for k, n in zip(kinds, counts)}))
        except (StoreError, OSError, KeyError, ValueError, TypeError) as e:
            return Inspection(str(e))

    def needs_backward(self, video_id: str) -> bool:
        """Whether the video's forward part is whole and it has no backward flows yet: it can gain
        them (`extract --direction both`) without being redone."""
        seen = self.inspect(video_id, backward=False)
        return seen.problem is None and seen.bflows == 0

    def video_ids(self) -> list[str]:
        """Ids of the videos present in the store (complete or not; see `check`), sorted."""
        return sorted(self._format.video_ids(self.root))
