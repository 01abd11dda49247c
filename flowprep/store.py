"""Frame and flow stores: the layouts `flowprep extract` writes and the trainer reads.

JPEG store (denseflow / MMAction2 layout, readable as-is by TSN-style loaders)::

    OUT/store.json                                   format and extraction parameters
    OUT/<class>/<video>/img_00001.jpg ...            RGB frames, 1-based
    OUT/<class>/<video>/flow_x_00001.jpg ...         n frames give n-1 flows
    OUT/<class>/<video>/flow_y_00001.jpg ...
    OUT/<class>/<video>/bflow_x_00001.jpg ...        backward flows (frame i+1 to i), with --direction both
    OUT/<class>/<video>/meta.json                    per-video attributes

HDF5 store (one file per video instead of thousands of small files)::

    OUT/<class>/<video>.h5   datasets rgb, flow_x, flow_y (and bflow_x, bflow_y): one JPEG-encoded
                             frame per element (variable-length uint8, chunked one frame per chunk),
                             attrs as meta.json

Flow is kept JPEG-encoded in HDF5 too: on bikes.mp4 at 340x256, 4.2 KiB per flow component
frame against 10.2 KiB for gzip'd (level 4) raw uint8 chunks.

With `--no-rgb` a video keeps only its flow: meta "rgb" is false, no img files / an empty rgb
dataset, and "frames" still counts the decoded frames, so flows = frames - 1 holds in every store.

Both stores also get OUT/manifest.jsonl (one record per attempt, last one wins) and an
MMAction2-style list file OUT/videos.txt (`<video_dir> <total_frames> <label>`).

A video is written under a temporary name (`.tmp.*`) and renamed into place when whole,
so an interrupted job never leaves a half video that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from twostream.atomic import TMP_PREFIX, remove_temps, temp_name, write_atomic

STORE_INFO = "store.json"
MANIFEST = "manifest.jsonl"
LIST_FILE = "videos.txt"
META = "meta.json"
FORMATS = ("jpeg", "hdf5")
FLOW_KINDS = {False: ("flow_x", "flow_y"), True: ("bflow_x", "bflow_y")}  # backward?


class StoreError(RuntimeError):
    """A store, or a video in it, is missing, incomplete or unreadable."""


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
    return json.loads(path.read_text())


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


def write_list_file(root: str | Path, records: Iterable[dict]) -> Path:
    """MMAction2 rawframes list: `<video_dir> <total_frames> <label index>`, classes sorted by name."""
    done = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["id"])
    classes = sorted({video_class(r["id"]) for r in done})
    index = {c: i for i, c in enumerate(classes)}
    path = Path(root) / LIST_FILE
    write_atomic(path, "".join(f"{r['id']} {r['frames']} {index[video_class(r['id'])]}\n" for r in done))
    return path


def clean_temps(root: str | Path) -> int:
    """Remove leftovers of interrupted writes (only call when no job is writing to the store)."""
    return remove_temps(root)


# ---------------------------------------------------------------- writers

def video_path(root: str | Path, video_id: str, fmt: str) -> Path:
    """Final location of a video in the store: a folder (jpeg) or a .h5 file (hdf5)."""
    p = Path(root) / video_id
    return p.with_name(p.name + ".h5") if fmt == "hdf5" else p


class JpegVideoWriter:
    """Writes one video's frames into a temporary folder; `commit` renames it into place."""

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

    def write_rgb(self, bgr: np.ndarray) -> None:
        (self.tmp / frame_name("img", self.frames)).write_bytes(encode_jpeg(bgr, self.quality))
        self.frames += 1
        self.rgb_written += 1

    def skip_rgb(self) -> None:
        """Count a frame without storing it (--no-rgb): `frames` stays the decoded count, flows = frames - 1."""
        self.frames += 1

    def write_flow(self, q: np.ndarray, backward: bool = False) -> None:
        """Write one quantized flow field (HxWx2 uint8, x then y); `backward`: frame i+1 to frame i."""
        i = self.bflows if backward else self.flows
        for c, kind in enumerate(FLOW_KINDS[backward]):
            (self.tmp / frame_name(kind, i)).write_bytes(encode_jpeg(q[..., c], self.quality))
        if backward:
            self.bflows += 1
        else:
            self.flows += 1

    def commit(self, meta: dict) -> Path:
        meta = dict(meta, frames=self.frames, flows=self.flows, bflows=self.bflows, format="jpeg", encoding="jpeg",
                    jpeg_quality=self.quality, rgb=self.rgb_written == self.frames, complete=True)
        (self.tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if self.final.exists():  # --overwrite: swap the old copy out before removing it
            old = temp_name(self.final, "old.")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class Hdf5VideoWriter:
    """Writes one video into a temporary .h5 file, appending frame by frame (bounded memory)."""

    def __init__(self, root: str | Path, video_id: str, jpeg_quality: int = 95):
        import h5py

        self.final = video_path(root, video_id, "hdf5")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.final)
        self.quality = jpeg_quality
        self.file = h5py.File(self.tmp, "w")
        self.ds = {}
        for name in ("rgb", "flow_x", "flow_y"):
            self._dataset(name)
        self.frames = 0
        self.flows = 0
        self.bflows = 0
        self.rgb_written = 0

    def _dataset(self, name: str):
        import h5py

        if name not in self.ds:
            # track_times=False keeps the file byte-identical for identical input.
            self.ds[name] = self.file.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1,),
                                                     dtype=h5py.vlen_dtype(np.uint8), track_times=False)
        return self.ds[name]

    def _append(self, name: str, data: bytes) -> None:
        ds = self._dataset(name)
        n = ds.shape[0]
        ds.resize((n + 1,))
        ds[n] = np.frombuffer(data, np.uint8)

    def write_rgb(self, bgr: np.ndarray) -> None:
        self._append("rgb", encode_jpeg(bgr, self.quality))
        self.frames += 1
        self.rgb_written += 1

    def skip_rgb(self) -> None:
        """Count a frame without storing it (--no-rgb): `frames` stays the decoded count, flows = frames - 1."""
        self.frames += 1

    def write_flow(self, q: np.ndarray, backward: bool = False) -> None:
        for c, kind in enumerate(FLOW_KINDS[backward]):
            self._append(kind, encode_jpeg(q[..., c], self.quality))
        if backward:
            self.bflows += 1
        else:
            self.flows += 1

    def commit(self, meta: dict) -> Path:
        meta = dict(meta, frames=self.frames, flows=self.flows, bflows=self.bflows, format="hdf5", encoding="jpeg",
                    jpeg_quality=self.quality, rgb=self.rgb_written == self.frames, complete=True)
        for k, v in meta.items():
            self.file.attrs[k] = json.dumps(v)  # JSON keeps nested params and types exact
        self.file.close()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def open_writer(fmt: str, root: str | Path, video_id: str, jpeg_quality: int = 95):
    """A writer for one video: `write_rgb`, `write_flow`, then `commit(meta)` (or `abort`)."""
    if fmt == "jpeg":
        return JpegVideoWriter(root, video_id, jpeg_quality)
    if fmt == "hdf5":
        return Hdf5VideoWriter(root, video_id, jpeg_quality)
    raise ValueError(f"store format must be one of {FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------- readers

class VideoReader:
    """Random access to one stored video. Indices are 0-based (file names are 1-based).

    `rgb(i)` -> HxWx3 uint8 RGB; `flow(i)` -> HxWx2 uint8 (x, y); `flow_stack(i, L)` -> HxWx2L
    uint8 ordered x_i, y_i, x_i+1, y_i+1, ...; `backward=True` reads the backward flows (frame
    i+1 to frame i) of a store extracted with --direction both; `*_bytes` give the encoded JPEG
    for decoders elsewhere (e.g. torchvision.io.decode_jpeg).
    """

    def __init__(self, root: Path, video_id: str, fmt: str):
        self.video_id = video_id
        self.format = fmt
        self.path = video_path(root, video_id, fmt)
        self._h5 = None
        if fmt == "jpeg":
            meta_path = self.path / META
            if not meta_path.is_file():
                raise StoreError(f"video {video_id} is not in the store {root} (no {meta_path})")
            self.meta = json.loads(meta_path.read_text())
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

    def _bytes(self, kind: str, i: int) -> bytes:
        if kind == "img" and not self.has_rgb:
            raise StoreError(f"video {self.video_id} was extracted with --no-rgb: the store holds flow only; "
                             "re-extract with --rgb for the spatial stream")
        if kind.startswith("bflow") and not self.num_bflows:
            raise StoreError(f"video {self.video_id} has no backward flow; extract with --direction both")
        n = self.num_frames if kind == "img" else self.num_bflows if kind.startswith("bflow") else self.num_flows
        if not 0 <= i < n:
            raise IndexError(f"{kind} index {i} out of range for {self.video_id} ({n} stored)")
        if self._h5 is None:
            return (self.path / frame_name(kind, i)).read_bytes()
        return self._h5["rgb" if kind == "img" else kind][i].tobytes()

    def rgb_bytes(self, i: int) -> bytes:
        return self._bytes("img", i)

    def flow_bytes(self, i: int, backward: bool = False) -> tuple[bytes, bytes]:
        kx, ky = FLOW_KINDS[backward]
        return self._bytes(kx, i), self._bytes(ky, i)

    def _what(self, kind: str, i: int) -> str:
        return f"{frame_name(kind, i)} of video {self.video_id}"

    def rgb(self, i: int) -> np.ndarray:
        return decode_jpeg(self.rgb_bytes(i), gray=False, what=self._what("img", i))

    def flow(self, i: int, backward: bool = False) -> np.ndarray:
        bx, by = self.flow_bytes(i, backward)
        kx, ky = FLOW_KINDS[backward]
        return np.stack([decode_jpeg(bx, True, self._what(kx, i)), decode_jpeg(by, True, self._what(ky, i))], axis=-1)

    def flow_stack(self, start: int, length: int, backward: bool = False) -> np.ndarray:
        if self._h5 is None:
            return np.concatenate([self.flow(start + k, backward) for k in range(length)], axis=-1)
        n = self.num_bflows if backward else self.num_flows
        if not (0 <= start and start + length <= n):
            raise IndexError(f"flows {start}..{start + length - 1} out of range for {self.video_id} ({n} stored)")
        if backward and not n:
            raise StoreError(f"video {self.video_id} has no backward flow; extract with --direction both")
        # One HDF5 read per direction: about 10x cheaper than 2L single-element reads.
        kx, ky = FLOW_KINDS[backward]
        xs, ys = self._h5[kx][start:start + length], self._h5[ky][start:start + length]
        return np.stack([decode_jpeg(b, True, self._what(k, start + i)) for i, pair in enumerate(zip(xs, ys))
                         for k, b in zip((kx, ky), pair)], axis=-1)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


KINDS = ("img", "flow_x", "flow_y", "bflow_x", "bflow_y")


def count_files(folder: Path) -> tuple[int, ...]:
    """(img, flow_x, flow_y, bflow_x, bflow_y) file counts in a JPEG-store video folder."""
    counts = dict.fromkeys(KINDS, 0)
    for entry in os.scandir(folder):
        kind = entry.name.rpartition("_")[0]
        if kind in counts and entry.name.endswith(".jpg"):
            counts[kind] += 1
    return tuple(counts.values())


class Store:
    """A store on disk. `Store(root)` reads OUT/store.json to learn the format."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"store {self.root} does not exist; run `flowprep extract --videos DIR --out {self.root}` first")
        self.info = read_store_info(self.root)
        self.format = self.info["format"]

    def open(self, video_id: str) -> VideoReader:
        return VideoReader(self.root, video_id, self.format)

    def check(self, video_id: str) -> str | None:
        """Cheap completeness check (no decoding): None when whole, else the reason.

        Used to skip finished videos on resume and to reject incomplete ones before training;
        `flowprep verify` goes further and decodes every frame.
        """
        path = video_path(self.root, video_id, self.format)
        try:
            with self.open(video_id) as v:
                if not v.meta.get("complete"):
                    return "not marked complete"
                if v.num_frames < 2 or v.num_flows != v.num_frames - 1:
                    return f"{v.num_frames} frames but {v.num_flows} flows (expected frames - 1)"
                if v.num_bflows not in (0, v.num_flows):
                    return f"{v.num_flows} forward but {v.num_bflows} backward flows"
                imgs = v.num_frames if v.has_rgb else 0
                expected = (imgs, v.num_flows, v.num_flows, v.num_bflows, v.num_bflows)
                if self.format == "jpeg":
                    counts = count_files(path)
                    if counts != expected:
                        return (f"meta.json says {imgs} images / {v.num_flows} flows / {v.num_bflows} backward "
                                f"flows but the folder holds " + ", ".join(f"{n} {k}" for k, n in zip(KINDS, counts))
                                + " files")
                else:
                    lens = tuple(v._h5[k].shape[0] if k in v._h5 else 0
                                 for k in ("rgb", "flow_x", "flow_y", "bflow_x", "bflow_y"))
                    if lens != expected:
                        return f"attributes say {v.num_frames}/{v.num_flows}/{v.num_bflows} but datasets hold {lens}"
        except (StoreError, OSError, KeyError, ValueError) as e:
            return str(e)
        return None

    def video_ids(self) -> list[str]:
        """Ids of the videos present in the store (complete or not; see `check`), sorted."""
        ids = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(TMP_PREFIX))
            rel = Path(dirpath).relative_to(self.root)
            if self.format == "jpeg" and META in filenames:
                ids.append(rel.as_posix())
                dirnames[:] = []
            elif self.format == "hdf5":
                ids += [(rel / f[:-3]).as_posix().removeprefix("./") for f in filenames
                        if f.endswith(".h5") and not f.startswith(TMP_PREFIX)]
        return sorted(ids)
