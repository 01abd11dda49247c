"""Frame and flow stores: the layouts `flowprep extract` writes and the trainer reads.

JPEG store (denseflow / MMAction2 layout, readable as-is by TSN-style loaders)::

    OUT/store.json                                   format and extraction parameters
    OUT/<class>/<video>/img_00001.jpg ...            RGB frames, 1-based
    OUT/<class>/<video>/flow_x_00001.jpg ...         n frames give n-1 flows
    OUT/<class>/<video>/flow_y_00001.jpg ...
    OUT/<class>/<video>/bflow_x_00001.jpg ...        backward flows (frame i+1 to i), with --direction both
    OUT/<class>/<video>/meta.json                    per-video attributes

HDF5 store (one file per video instead of thousands of small files)::

    OUT/<class>/<video>.h5   datasets rgb, flow_x, flow_y (and bflow_x, bflow_y), attrs as meta.json

RGB is always one JPEG per element (variable-length uint8, one frame per chunk). Flow has two
codecs (`--flow-codec`, store.json and meta "flow_codec"):

- jpeg (default): like RGB, one JPEG per flow component frame. Smallest, lossy (q95 on bikes.mp4
  flow: 12% of the codes change, by 0.13 levels on average and at most 9, a level being 2b/255 =
  0.16 px), and a L=10 stack costs 20 JPEG decodes.
- raw: flow_x / flow_y (bflow_*) are uint8 arrays of shape (n-1, H, W), one frame per chunk,
  uncompressed. Lossless and the fastest to read; 14x the bytes of jpeg.

Why raw is uncompressed: `VideoReader.flow_stack(t, 10)` (read + decode + interleave, both
components), bikes.mp4 at 340x256, TV-L1 fast, bound 20, one core of a shared 2-core Xeon (min
of 5 medians of 200 random stacks; absolute times are rough), and bytes per flow component frame::

    JPEG store (files), q95            6.1 KB    3.6 ms   (5.7 ms before cv2.merge replaced np.stack)
    HDF5, jpeg flow, q95               6.1 KB    3.6 ms
    HDF5, raw, no filter              87.0 KB    0.9 ms   <- raw
    HDF5, raw, lzf                    31.7 KB    6.4 ms
    HDF5, raw, gzip 1                 20.8 KB    5.6 ms   (shuffle + gzip 1: the same; shuffle is a no-op on bytes)
    HDF5, raw, gzip 4                 17.1 KB    5.1 ms   (gzip 2 / 3: 19.5 / 18.5 KB, in between)
    raw, scaleoffset (lossless)       73.6 KB    4.2 ms   (measured with h5py directly, as the two below)
    raw interleaved (n,H,W,2)         87.0 KB    4.6 ms   (the transpose to HxWx2L costs more than it saves)
    raw as (H,W,n,2), chunk (H,W,10,2) 87.4 KB   1.4 ms   (no interleave step, but slower reads)
    raw, no filter, chunk (10,H,W)    87.4 KB    1.1 ms

Every built-in filter inflates at 250-350 MB/s here, so a stack (1.7 MB of planes) costs more to
decompress than its 20 JPEGs cost to decode, at 3x their bytes: compressed raw loses to jpeg on
both counts. One frame per chunk: a stack is one read per component, of L consecutive chunks
and nothing outside the stack, straight into a preallocated buffer (`read_direct`), then one
`cv2.merge` interleaves the 2L planes into HxWx2L (x1, y1, x2, y2, ...), 3x faster than numpy's
strided copy. Readers do not depend on the filter (HDF5 applies it), so a store written with
another one reads the same; meta "flow_storage" records what was used.

With `--no-rgb` a video keeps only its flow: meta "rgb" is false, no img files / an empty rgb
dataset, and "frames" still counts the decoded frames, so flows = frames - 1 holds in every store.

Every stored frame has a checksum: the CRC32 of its stored bytes (the JPEG; for raw flow the
HxW plane, row-major), taken as it is written (meta.json "crc32": per kind, 8 hex digits per frame
in order; in HDF5, uint32 datasets crc32_rgb, crc32_flow_x, ...). A decoder accepts a JPEG with bytes changed in place (it just shows the wrong
picture), so only the checksum finds such damage; `flowprep verify` checks every one. The cheap
`Store.check` (resume, training) compares counts only: a full pass reads every byte.

Store-level files::

    OUT/store.json          parameters (a resumed job must match them), labels and MMAction2 settings
    OUT/manifest.jsonl      one record per attempt, last one wins: status ok / partial / failed
    OUT/expected.json       every video any job on this store was asked for (id -> source), so
                            `flowprep verify` knows what a finished store holds
    OUT/verify.json         the last verify's findings, redone by the next `flowprep extract`
    OUT/videos.txt          MMAction2-style list `<video_dir> <total_frames> <label>` (see lists.py)
    OUT/lists/              MMAction2 rawframe lists per modality (and per split with --splits)

Names starting with "." are the store's own and never a video: `.tmp.*` (writes in progress),
`.flowprep.lock` (the job holding the store, flowprep/lock.py), `.logs/` (Ray's logs of a job
whose workers died); so is `lists/`. Video ids therefore are clean relative paths that avoid
these names (`id_problem`).

A video is written under a temporary name (`.tmp.*`) and renamed into place when whole,
so an interrupted job never leaves a half video that looks complete.

Backward flows added to a finished video (`extract --direction both` on a forward store,
`open_backward_writer`) never touch its forward frames. JPEG: the bflow files are written into a
temporary folder inside the video folder, moved into place, and meta.json (rewritten atomically,
last) is what makes them count: until then meta says bflows 0, and a folder holding bflow files
that meta does not count fails `Store.check`. HDF5: the file is copied to a temporary name, the
datasets are added to the copy, and the copy replaces the file when whole: the forward datasets
keep their bytes (copied, not recomputed or re-encoded), a crash leaves the original file as it
was, and a trainer reading the file meanwhile keeps reading the old one. (Adding the datasets in
place with h5py's r+ would save the copy, but HDF5 has no journal: a crash mid-write can leave
the whole file, forward flows included, unreadable.)

A store whose store.json says direction "both" requires backward flows of every video
(`Store.check`); stores written before `direction` and `flow_codec` existed read as "forward"
and "jpeg".
"""
from __future__ import annotations

import errno as errnos
import json
import os
import shutil
import unicodedata
import zlib
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from twostream.atomic import remove_temps, temp_name, write_atomic

STORE_INFO = "store.json"
MANIFEST = "manifest.jsonl"
LIST_FILE = "videos.txt"
EXPECTED = "expected.json"
FINDINGS = "verify.json"
LOGS = ".logs"
LISTS = "lists"  # MMAction2 list files (flowprep/lists.py)
META = "meta.json"
FORMATS = ("jpeg", "hdf5")
FLOW_CODECS = ("jpeg", "raw")
DIRECTIONS = ("forward", "both")
FLOW_KINDS = {False: ("flow_x", "flow_y"), True: ("bflow_x", "bflow_y")}  # backward?
KINDS = ("img", "flow_x", "flow_y", "bflow_x", "bflow_y")
H5_NAMES = {"img": "rgb", "flow_x": "flow_x", "flow_y": "flow_y", "bflow_x": "bflow_x", "bflow_y": "bflow_y"}
# A video whose record has one of these statuses is in the store (partial: its source was cut short).
DONE = ("ok", "partial")
# store.json keys that are not extraction parameters: a resumed job need not match them.
LISTING_KEYS = ("labels_from", "classes", "splits", "mmaction2")
# A video failing with one of these (writing the store) stops the job: the next would fail too.
STOP_ERRNOS = {errnos.ENOSPC: "the disk is full", errnos.EDQUOT: "the disk quota is exceeded",
               errnos.EROFS: "the store's file system is read-only"}


class StoreError(RuntimeError):
    """A store, or a video in it, is missing, incomplete or unreadable."""


def id_problem(video_id: str) -> str | None:
    """Why `video_id` cannot name a video in a store, or None when it can.

    An id is a path inside the store, so it must be relative, '/'-separated, without '.' or '..'
    parts (nothing may be written or removed outside the store), without parts starting with '.'
    (the store's own names), and free of whitespace and control characters (list files separate
    columns by whitespace, one video a line) and of bytes that are not UTF-8.
    """
    if not video_id:
        return "an empty name"
    try:
        video_id.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not valid UTF-8"
    if video_id.startswith("/"):
        return "an absolute path (ids are paths relative to --videos)"
    parts = video_id.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with '..', '.' or empty parts (ids are clean paths relative to --videos)"
    if any(p.startswith(".") for p in parts):
        return "a hidden name (starting with '.'), reserved for the store's own files"
    if parts[0] == LISTS:
        return f"'{LISTS}' as its first folder: OUT/{LISTS}/ holds the store's list files"
    if any(c.isspace() for c in video_id):
        return "whitespace in the name, which list files (videos.txt, MMAction2 lists) cannot hold"
    if any(unicodedata.category(c) == "Cc" for c in video_id):
        return "a control character in the name"
    return None


def video_class(video_id: str) -> str:
    """Class of a video id: its first folder, or "" for a video at the top of a flat folder."""
    return video_id.split("/", 1)[0] if "/" in video_id else ""


def frame_name(kind: str, index: int) -> str:
    """File name of frame `index` (0-based) for kind 'img', 'flow_x', 'flow_y', 'bflow_x' or 'bflow_y'
    (files are 1-based)."""
    return f"{kind}_{index + 1:05d}.jpg"


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise StoreError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    return buf.tobytes()


def decode_jpeg(data: bytes | np.ndarray, gray: bool, what: str = "a stored JPEG frame") -> np.ndarray:
    """Decode JPEG bytes: grayscale HxW, or colour HxWx3 in RGB order."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise StoreError(f"{what} does not decode (corrupt or truncated JPEG)")
    return img if gray else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------- store-level files

def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_store_info(root: str | Path) -> dict:
    path = Path(root) / STORE_INFO
    if not path.is_file():
        raise StoreError(f"{root} is not a flowprep store (no {STORE_INFO}); run `flowprep extract` to make one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is damaged (not JSON: {e}); `flowprep extract --overwrite` with the store's "
                         "options rewrites it (and redoes every video)") from None


def write_store_info(root: str | Path, info: dict) -> None:
    if info.get("format") not in FORMATS:
        raise ValueError(f"store format must be one of {FORMATS}, got {info.get('format')!r}")
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / STORE_INFO, info)


def append_manifest(root: str | Path, record: dict) -> None:
    """Append one record; a single line written in one call, so readers never see half a record."""
    with open(Path(root) / MANIFEST, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_manifest(root: str | Path) -> dict[str, dict]:
    """Latest manifest record per video id (a resumed job appends newer records)."""
    path = Path(root) / MANIFEST
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: the video is re-checked anyway
                records[rec["id"]] = rec
    return records


def write_list_file(root: str | Path, records: Iterable[dict], labels: dict[str, int] | None = None) -> Path:
    """MMAction2 rawframes list: `<video_dir> <total_frames> <label index>` of every video in the store.

    `labels`: class name -> index (from a split folder's class index, flowprep/lists.py); default:
    classes sorted by name. Classes without a label (not in the index) are left out.
    """
    done = sorted((r for r in records if r.get("status") in DONE), key=lambda r: r["id"])
    if labels is None:
        labels = {c: i for i, c in enumerate(sorted({video_class(r["id"]) for r in done}))}
    path = Path(root) / LIST_FILE
    write_atomic(path, "".join(f"{r['id']} {r['frames']} {labels[video_class(r['id'])]}\n" for r in done
                               if video_class(r["id"]) in labels))
    return path


def read_json(path: Path, default):
    """A store-level JSON file, or `default` when it is absent (or cut by a crash: it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError:
        return default


def read_expected(root: str | Path) -> dict[str, str]:
    """Every video any job on the store was asked for: id -> source path."""
    return read_json(Path(root) / EXPECTED, {}).get("videos", {})


def add_expected(root: str | Path, videos: Iterable[tuple[str, Path]]) -> None:
    """Add a job's videos to OUT/expected.json (a union: a later job with a shorter list keeps the others)."""
    known = read_expected(root)
    new = {**known, **{vid: str(src) for vid, src in videos}}
    if new != known or not (Path(root) / EXPECTED).is_file():
        write_json_atomic(Path(root) / EXPECTED, {"videos": dict(sorted(new.items()))})


def read_findings(root: str | Path) -> dict[str, str]:
    """Videos the last `flowprep verify` (or --repair) found damaged: id -> what it found."""
    return read_json(Path(root) / FINDINGS, {}).get("problems", {})


def write_findings(root: str | Path, problems: dict[str, str]) -> None:
    """Record verify's findings for the next extract to redo; no file when there are none."""
    path = Path(root) / FINDINGS
    if problems:
        write_json_atomic(path, {"problems": dict(sorted(problems.items()))})
    else:
        path.unlink(missing_ok=True)


def clean_temps(root: str | Path) -> int:
    """Remove leftovers of interrupted writes (only call when no job is writing to the store)."""
    return remove_temps(root)


# ---------------------------------------------------------------- writers

def video_path(root: str | Path, video_id: str, fmt: str) -> Path:
    """Final location of a video in the store: a folder (jpeg) or a .h5 file (hdf5).

    Refuses ids that are not clean relative paths (`id_problem`): whatever asks, nothing outside
    the store is ever written, replaced or removed through a video id.
    """
    problem = id_problem(video_id)
    if problem:
        raise StoreError(f"{video_id!r} cannot be a video id: {problem}")
    p = Path(root) / video_id
    return p.with_name(p.name + ".h5") if fmt == "hdf5" else p


def crc_hex(crcs: list[int]) -> str:
    return "".join(f"{c:08x}" for c in crcs)


def crc_list(text: str) -> list[int]:
    return [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]


def _merge(planes: list[np.ndarray]) -> np.ndarray:
    """HxW planes -> HxWxC in one pass (cv2.merge: about 3x faster than np.stack's strided copy)."""
    if 2 <= len(planes) <= 512:  # OpenCV's channel limit (CV_CN_MAX)
        return cv2.merge(planes)
    return np.stack(planes, axis=-1)


def _plane(q: np.ndarray, c: int) -> np.ndarray:
    return np.ascontiguousarray(q[..., c])


def _read_meta(path: Path, video_id: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} of video {video_id} is damaged (not JSON: {e}); `flowprep extract` redoes it") from None


def os_error_sentence(e: OSError, store: str | Path) -> str:
    """An OSError out of one video as a sentence: the error, its file, and for a STOP_ERRNOS
    error what it means for the store."""
    where = f" ({e.filename})" if e.filename else ""
    stop = f": {STOP_ERRNOS[e.errno]} where the store {store} is" if e.errno in STOP_ERRNOS else ""
    return f"{e.strerror or e}{where}{stop}"


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


class _Writer:
    """A write that is whole or nothing: `with` aborts it when the block raises (subclasses
    define `abort`, which removes what was written under the temporary name)."""

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class JpegVideoWriter(_Writer):
    """Writes one video's frames into a temporary folder; `commit` renames it into place."""

    flow_codec = "jpeg"

    def __init__(self, root: str | Path, video_id: str, jpeg_quality: int = 95):
        self.final = video_path(root, video_id, "jpeg")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.final)
        self.tmp.mkdir()
        self.quality = jpeg_quality
        self.frames = 0
        self.flows = 0
        self.bflows = 0
        self.rgb_written = 0
        self.crc: dict[str, list[int]] = {k: [] for k in KINDS}

    def _write(self, kind: str, index: int, data: bytes) -> None:
        (self.tmp / frame_name(kind, index)).write_bytes(data)
        self.crc[kind].append(zlib.crc32(data))

    def write_rgb(self, bgr: np.ndarray) -> None:
        self._write("img", self.frames, encode_jpeg(bgr, self.quality))
        self.frames += 1
        self.rgb_written += 1

    def skip_rgb(self) -> None:
        """Count a frame without storing it (--no-rgb): `frames` stays the decoded count, flows = frames - 1."""
        self.frames += 1

    def write_flow(self, q: np.ndarray, backward: bool = False) -> None:
        """Write one quantized flow field (HxWx2 uint8, x then y); `backward`: frame i+1 to frame i."""
        i = self.bflows if backward else self.flows
        for c, kind in enumerate(FLOW_KINDS[backward]):
            self._write(kind, i, encode_jpeg(q[..., c], self.quality))
        if backward:
            self.bflows += 1
        else:
            self.flows += 1

    def commit(self, meta: dict) -> Path:
        crc = {k: crc_hex(v) for k, v in self.crc.items() if v or k in ("img", "flow_x", "flow_y")}
        meta = dict(meta, frames=self.frames, flows=self.flows, bflows=self.bflows, format="jpeg", encoding="jpeg",
                    flow_codec="jpeg", jpeg_quality=self.quality, rgb=self.rgb_written == self.frames, complete=True,
                    crc32=crc)
        return commit_folder(self.tmp, self.final, meta)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Hdf5VideoWriter(_Writer):
    """Writes one video into a temporary .h5 file, appending frame by frame (bounded memory).

    flow_codec "jpeg": flows as JPEGs like RGB; "raw": uint8 (n-1, H, W) datasets (module docstring).
    """

    def __init__(self, root: str | Path, video_id: str, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
        import h5py

        if flow_codec not in FLOW_CODECS:
            raise ValueError(f"flow_codec must be one of {FLOW_CODECS}, got {flow_codec!r}")
        self.final = video_path(root, video_id, "hdf5")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.final)
        self.quality = jpeg_quality
        self.flow_codec = flow_codec
        self.file = h5py.File(self.tmp, "w")
        self.ds = {}
        self._dataset("rgb")
        if flow_codec == "jpeg":  # raw flow datasets need the frame size: made on the first flow
            for name in ("flow_x", "flow_y"):
                self._dataset(name)
        self.frames = 0
        self.flows = 0
        self.bflows = 0
        self.rgb_written = 0
        self.crc: dict[str, list[int]] = {"rgb": [], "flow_x": [], "flow_y": []}

    def _dataset(self, name: str, plane: tuple[int, int] | None = None):
        import h5py

        if name not in self.ds:
            # track_times=False keeps the file byte-identical for identical input.
            if name == "rgb" or self.flow_codec == "jpeg":
                self.ds[name] = self.file.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1,),
                                                         dtype=h5py.vlen_dtype(np.uint8), track_times=False)
            else:
                h, w = plane
                self.ds[name] = self.file.create_dataset(name, shape=(0, h, w), maxshape=(None, h, w),
                                                         chunks=(1, h, w), dtype=np.uint8, track_times=False,
                                                         **RAW_FILTER)
        return self.ds[name]

    def _append(self, name: str, data: bytes | np.ndarray) -> None:
        raw = isinstance(data, np.ndarray)
        ds = self._dataset(name, data.shape if raw else None)
        n = ds.shape[0]
        if raw and data.shape != ds.shape[1:]:
            raise StoreError(f"a flow field of shape {data.shape} in a video of {ds.shape[1:]} frames")
        ds.resize((n + 1, *ds.shape[1:]))
        ds[n] = data if raw else np.frombuffer(data, np.uint8)
        self.crc.setdefault(name, []).append(zlib.crc32(data))

    def write_rgb(self, bgr: np.ndarray) -> None:
        self._append("rgb", encode_jpeg(bgr, self.quality))
        self.frames += 1
        self.rgb_written += 1

    def skip_rgb(self) -> None:
        """Count a frame without storing it (--no-rgb): `frames` stays the decoded count, flows = frames - 1."""
        self.frames += 1

    def write_flow(self, q: np.ndarray, backward: bool = False) -> None:
        for c, kind in enumerate(FLOW_KINDS[backward]):
            self._append(kind, _plane(q, c) if self.flow_codec == "raw" else encode_jpeg(q[..., c], self.quality))
        if backward:
            self.bflows += 1
        else:
            self.flows += 1

    def _storage(self) -> dict:
        if self.flow_codec == "jpeg":
            return {"layout": "one JPEG per element", "jpeg_quality": self.quality}
        ds = self.ds.get("flow_x")
        return {"layout": "uint8 (n-1, H, W)", "chunks": list(ds.chunks) if ds is not None else None,
                "compression": ds.compression if ds is not None else RAW_FILTER.get("compression")}

    def _write_crcs(self) -> None:
        for name, crcs in self.crc.items():
            # Datasets, not attributes: an attribute holds at most 64 KiB, 16k frames' checksums.
            self.file.create_dataset(f"crc32_{name}", data=np.array(crcs, np.uint32), track_times=False)

    def _replace_final(self, meta: dict) -> Path:
        self.file.close()
        if self.final.is_dir():
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.final} is in the way of video {meta.get('id', self.final.name)}: a folder, "
                             "not a video file; move it out of the store")
        os.replace(self.tmp, self.final)
        return self.final

    def commit(self, meta: dict) -> Path:
        meta = dict(meta, frames=self.frames, flows=self.flows, bflows=self.bflows, format="hdf5", encoding="jpeg",
                    flow_codec=self.flow_codec, flow_storage=self._storage(), jpeg_quality=self.quality,
                    rgb=self.rgb_written == self.frames, complete=True)
        for k, v in meta.items():
            self.file.attrs[k] = json.dumps(v)  # JSON keeps nested params and types exact
        self._write_crcs()
        return self._replace_final(meta)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# Raw flow datasets: no compression filter (module docstring: every built-in one costs more to
# inflate than JPEG costs to decode). A dict of h5py create_dataset keywords.
RAW_FILTER: dict = {}


def open_writer(fmt: str, root: str | Path, video_id: str, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
    """A writer for one video: `write_rgb`, `write_flow`, then `commit(meta)` (or `abort`).

    flow_codec: "jpeg", or "raw" (HDF5 only): uncompressed uint8 flow planes, lossless and fastest to read.
    """
    if flow_codec not in FLOW_CODECS:
        raise ValueError(f"flow_codec must be one of {FLOW_CODECS}, got {flow_codec!r}")
    if fmt == "jpeg":
        if flow_codec != "jpeg":
            raise ValueError("flow_codec 'raw' needs the hdf5 format: a JPEG store is one JPEG file per frame")
        return JpegVideoWriter(root, video_id, jpeg_quality)
    if fmt == "hdf5":
        return Hdf5VideoWriter(root, video_id, jpeg_quality, flow_codec)
    raise ValueError(f"store format must be one of {FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------- adding backward flows

class JpegBackwardWriter(_Writer):
    """Adds backward flows to a finished JPEG-store video: files into a temporary folder inside it,
    moved into place at `commit`, then meta.json rewritten (atomically, last: what makes them count).
    The forward files are never opened for writing."""

    def __init__(self, root: str | Path, video_id: str):
        self.final = video_path(root, video_id, "jpeg")
        self.meta = _read_meta(self.final / META, video_id)
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
        meta = dict(self.meta, **changes, bflows=self.bflows, crc32=crc)
        write_json_atomic(self.final / META, meta)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Hdf5BackwardWriter(Hdf5VideoWriter):
    """Adds backward flows to a finished .h5 video: a copy of the file gains the datasets and
    replaces it when whole (module docstring: why a copy and not h5py's r+ in place)."""

    def __init__(self, root: str | Path, video_id: str):
        import h5py

        self.final = video_path(root, video_id, "hdf5")
        self.tmp = temp_name(self.final)
        shutil.copyfile(self.final, self.tmp)
        try:
            self.file = h5py.File(self.tmp, "r+")
            self.meta = {k: json.loads(v) for k, v in self.file.attrs.items()}
        except (OSError, ValueError) as e:
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.final} is not a readable video file: {e}") from e
        self.quality = int(self.meta.get("jpeg_quality", 95))
        self.flow_codec = self.meta.get("flow_codec", "jpeg")
        for name in ("bflow_x", "bflow_y", "crc32_bflow_x", "crc32_bflow_y"):  # none in a whole forward file
            if name in self.file:
                del self.file[name]
        self.ds = {}
        self.bflows = 0
        self.flows = int(self.meta["flows"])
        self.crc = {"bflow_x": [], "bflow_y": []}

    def write_flow(self, q: np.ndarray, backward: bool = True) -> None:
        super().write_flow(q, backward=True)

    def commit(self, changes: dict) -> Path:
        meta = dict(self.meta, **changes, bflows=self.bflows)
        for k, v in meta.items():
            self.file.attrs[k] = json.dumps(v)
        self._write_crcs()
        return self._replace_final(meta)


def open_backward_writer(fmt: str, root: str | Path, video_id: str):
    """A writer adding backward flows to a finished video: `write_flow(q)` per flow (frame i+1 to
    frame i, in order), then `commit(meta changes)` (or `abort`); the forward frames are left as
    they are. Same codec and JPEG quality as the video's forward flows."""
    if fmt == "jpeg":
        return JpegBackwardWriter(root, video_id)
    if fmt == "hdf5":
        return Hdf5BackwardWriter(root, video_id)
    raise ValueError(f"store format must be one of {FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------- readers

class VideoReader:
    """Random access to one stored video. Indices are 0-based (file names are 1-based).

    `rgb(i)` -> HxWx3 uint8 RGB; `flow(i)` -> HxWx2 uint8 (x, y); `flow_stack(i, L)` -> HxWx2L
    uint8 ordered x_i, y_i, x_i+1, y_i+1, ...; `backward=True` reads the backward flows (frame
    i+1 to frame i) of a store extracted with --direction both. `*_bytes` give the stored bytes:
    the encoded JPEG (for decoders elsewhere, e.g. torchvision.io.decode_jpeg), or for raw flow
    (`flow_codec == "raw"`) the HxW uint8 plane.
    """

    def __init__(self, root: Path, video_id: str, fmt: str):
        self.video_id = video_id
        self.format = fmt
        self.path = video_path(root, video_id, fmt)
        self._h5 = None
        self._ds: dict = {}
        if fmt == "jpeg":
            meta_path = self.path / META
            if not meta_path.is_file():
                raise StoreError(f"video {video_id} is not in the store {root} (no {meta_path})")
            self.meta = _read_meta(meta_path, video_id)
        else:
            import h5py

            if not self.path.is_file():
                raise StoreError(f"video {video_id} is not in the store {root} (no {self.path})")
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as e:
                raise StoreError(f"{self.path} is not a readable HDF5 file: {e}") from e
            self.meta = {k: json.loads(v) for k, v in self._h5.attrs.items()}
        self.num_frames = int(self.meta["frames"])
        self.num_flows = int(self.meta["flows"])
        self.num_bflows = int(self.meta.get("bflows", 0))
        self.has_rgb = bool(self.meta.get("rgb", True))  # False: extracted with --no-rgb (flow only)
        self.flow_codec = self.meta.get("flow_codec", "jpeg")
        self._raw = self._h5 is not None and self.flow_codec == "raw"

    def _dataset(self, kind: str):
        """The HDF5 dataset of `kind`, looked up once (a lookup costs about as much as a small read)."""
        ds = self._ds.get(kind)
        if ds is None:
            ds = self._ds[kind] = self._h5[H5_NAMES[kind]]
        return ds

    def _check_index(self, kind: str, i: int, length: int = 1) -> None:
        if kind == "img" and not self.has_rgb:
            raise StoreError(f"video {self.video_id} was extracted with --no-rgb: the store holds flow only; "
                             "re-extract with --rgb for the spatial stream")
        if kind.startswith("bflow") and not self.num_bflows:
            raise StoreError(f"video {self.video_id} has no backward flow; extract with --direction both")
        n = self.num_frames if kind == "img" else self.num_bflows if kind.startswith("bflow") else self.num_flows
        if not (0 <= i and i + length <= n):
            what = f"index {i}" if length == 1 else f"indices {i}..{i + length - 1}"
            raise IndexError(f"{kind} {what} out of range for {self.video_id} ({n} stored)")

    def _bytes(self, kind: str, i: int) -> bytes:
        self._check_index(kind, i)
        if self._h5 is None:
            return (self.path / frame_name(kind, i)).read_bytes()
        return self._dataset(kind)[i].tobytes()

    def rgb_bytes(self, i: int) -> bytes:
        return self._bytes("img", i)

    def count(self, kind: str) -> int:
        """How many frames of `kind` ('img', 'flow_x', ...) the video holds."""
        if kind == "img":
            return self.num_frames if self.has_rgb else 0
        return self.num_bflows if kind.startswith("bflow") else self.num_flows

    def frame_bytes(self, kind: str, i: int) -> bytes:
        """Stored bytes of frame i (0-based) of `kind`: a JPEG, or a raw HxW plane (raw flow)."""
        return self._bytes(kind, i)

    def checksums(self) -> dict[str, list[int]] | None:
        """kind -> CRC32 of each stored frame's bytes, as written; None for a video stored before
        flowprep recorded them."""
        if self._h5 is None:
            crc = self.meta.get("crc32")
            return None if crc is None else {k: crc_list(v) for k, v in crc.items()}
        if "crc32_rgb" not in self._h5:
            return None
        return {k: [int(c) for c in self._h5[f"crc32_{name}"][()]] for k, name in H5_NAMES.items()
                if f"crc32_{name}" in self._h5}

    def flow_bytes(self, i: int, backward: bool = False) -> tuple[bytes, bytes]:
        kx, ky = FLOW_KINDS[backward]
        return self._bytes(kx, i), self._bytes(ky, i)

    def _what(self, kind: str, i: int) -> str:
        return f"{frame_name(kind, i)} of video {self.video_id}"

    def rgb(self, i: int) -> np.ndarray:
        return decode_jpeg(self.rgb_bytes(i), gray=False, what=self._what("img", i))

    def flow(self, i: int, backward: bool = False) -> np.ndarray:
        return self.flow_stack(i, 1, backward)

    def flow_stack(self, start: int, length: int, backward: bool = False) -> np.ndarray:
        """HxWx2L uint8, x_start, y_start, x_start+1, ...: `flow_planes` interleaved (cv2.merge,
        which copies: the result is the caller's)."""
        return _merge(list(self.flow_planes(start, length, backward)))

    def flow_planes(self, start: int, length: int, backward: bool = False,
                    box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(2L, h, w) uint8, planes x_start, y_start, x_start+1, ... (the trainer's planar layout),
        of the region box = (y, x, h, w) or the whole frame. Raw-coded HDF5 reads only the region
        (two reads); JPEG decodes whole planes (JPEG cannot do less).
        A fresh array: the caller may keep it."""
        kx, ky = FLOW_KINDS[backward]
        self._check_index(kx, start, length)
        if self._raw:
            dx, dy = self._dataset(kx), self._dataset(ky)
            y, x, h, w = box or (0, 0, *dx.shape[1:])
            src = np.s_[start:start + length, y:y + h, x:x + w]
            out = np.empty((length, 2, h, w), np.uint8)
            # Read each component whole, then interleave: reading into a strided destination
            # takes h5py's element-wise path, 200x slower.
            out[:, 0], out[:, 1] = dx[src], dy[src]
            return out.reshape(2 * length, h, w)
        if self._h5 is None:
            data = [(self.path / frame_name(k, start + j)).read_bytes() for j in range(length) for k in (kx, ky)]
        else:
            xs, ys = self._dataset(kx)[start:start + length], self._dataset(ky)[start:start + length]
            data = [b for pair in zip(xs, ys) for b in pair]
        kinds = [k for j in range(length) for k in (kx, ky)]
        frames = [start + j for j in range(length) for _ in (kx, ky)]
        planes = np.stack([decode_jpeg(d, True, self._what(k, i)) for d, k, i in zip(data, kinds, frames)])
        if box is not None:
            y, x, h, w = box
            planes = planes[:, y:y + h, x:x + w]
        return planes

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the stored frames (meta, else the first stored frame)."""
        if "size" not in self.meta:
            f = self.rgb(0) if self.has_rgb else self.flow(0)
            self.meta["size"] = [f.shape[1], f.shape[0]]
        w, h = self.meta["size"]
        return int(w), int(h)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self._ds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def count_files(folder: Path) -> tuple[int, ...]:
    """(img, flow_x, flow_y, bflow_x, bflow_y) file counts in a JPEG-store video folder."""
    counts = dict.fromkeys(KINDS, 0)
    for entry in os.scandir(folder):
        kind = entry.name.rpartition("_")[0]
        if kind in counts and entry.name.endswith(".jpg"):
            counts[kind] += 1
    return tuple(counts.values())


def store_direction(info: dict) -> str:
    """direction of a store (store.json, or a video's meta); "forward" for stores from before it was recorded."""
    return info.get("direction") or "forward"


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
        self.direction = store_direction(self.info)
        self.findings = read_findings(self.root) if findings else {}

    def open(self, video_id: str) -> VideoReader:
        return VideoReader(self.root, video_id, self.format)

    def check(self, video_id: str, backward: bool | None = None) -> str | None:
        """Cheap completeness check (no decoding): None when whole, else the reason.

        Used to skip finished videos on resume and to reject incomplete ones before training;
        `flowprep verify` goes further: every frame's checksum, and a decode.
        backward: require backward flows (default: when the store's direction is "both");
        False checks the forward part only, ignoring backward files (is it ready to gain them?).
        """
        if video_id in self.findings:
            return f"flagged by flowprep verify: {self.findings[video_id]}; `flowprep extract` redoes it"
        need = self.direction == "both" if backward is None else backward
        try:
            path = video_path(self.root, video_id, self.format)
            with self.open(video_id) as v:
                if not v.meta.get("complete"):
                    return "not marked complete"
                if v.num_frames < 2 or v.num_flows != v.num_frames - 1:
                    return f"{v.num_frames} frames but {v.num_flows} flows (expected frames - 1)"
                if v.num_bflows not in (0, v.num_flows):
                    return f"{v.num_flows} forward but {v.num_bflows} backward flows"
                if need and v.num_bflows != v.num_flows:
                    return ("no backward flows, and the store is --direction both; `flowprep extract --direction "
                            "both` adds them")
                imgs = v.num_frames if v.has_rgb else 0
                bflows = v.num_bflows if backward is not False else 0
                extra = v.meta.get("extra_files") or {}  # adopted in place: source files past the stored range
                expected = tuple(n + int(extra.get(k, 0)) for k, n in
                                 zip(KINDS, (imgs, v.num_flows, v.num_flows, bflows, bflows)))
                kinds = KINDS if backward is not False else KINDS[:3]
                if self.format == "jpeg":
                    counts = count_files(path)
                    if counts[:len(kinds)] != expected[:len(kinds)]:
                        return (f"meta.json says {imgs} images / {v.num_flows} flows / {v.num_bflows} backward "
                                f"flows but the folder holds " + ", ".join(f"{n} {k}" for k, n in zip(KINDS, counts))
                                + " files")
                else:
                    lens = tuple(v._h5[H5_NAMES[k]].shape[0] if H5_NAMES[k] in v._h5 else 0 for k in kinds)
                    if lens != expected[:len(kinds)]:
                        return f"attributes say {v.num_frames}/{v.num_flows}/{v.num_bflows} but datasets hold {lens}"
                    if v.flow_codec == "raw":
                        w, h = v.meta["size"]
                        shapes = {v._h5[H5_NAMES[k]].shape[1:] for k in kinds[1:] if H5_NAMES[k] in v._h5}
                        if shapes - {(h, w)}:
                            return f"raw flow planes of shape {sorted(shapes)}, but the video is {w}x{h}"
        except (StoreError, OSError, KeyError, ValueError, TypeError) as e:
            return str(e)
        return None

    def needs_backward(self, video_id: str) -> bool:
        """Whether the video's forward part is whole and it has no backward flows yet: it can gain
        them (`extract --direction both`) without being redone."""
        if self.check(video_id, backward=False) is not None:
            return False
        try:
            with self.open(video_id) as v:
                return v.num_bflows == 0
        except (StoreError, OSError, KeyError, ValueError):
            return False

    def video_ids(self) -> list[str]:
        """Ids of the videos present in the store (complete or not; see `check`), sorted."""
        ids = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            # Dot names (.tmp.*, .logs, the lock) are the store's own; ids never have them.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root)
            if self.format == "jpeg" and META in filenames and rel != Path("."):
                ids.append(rel.as_posix())
                dirnames[:] = []
            elif self.format == "hdf5":
                ids += [(rel / f[:-3]).as_posix().removeprefix("./") for f in filenames
                        if f.endswith(".h5") and not f.startswith(".")]
        return sorted(ids)
