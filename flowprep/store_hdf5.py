"""The HDF5 store format: one file per video instead of thousands of small files::

    OUT/<class>/<video>.h5   datasets rgb, flow_x, flow_y (and bflow_x, bflow_y), attributes as meta.json

RGB is always one JPEG per element (variable-length uint8, one frame per chunk). Flow has two
codecs (`--flow-codec`, store.json and meta "flow_codec"):

- jpeg (default): like RGB, one JPEG per flow component frame. Smallest, lossy (q95 on bikes.mp4
  flow: 12% of the codes change, by 0.13 levels on average and at most 9, a level being 2b/255 =
  0.16 px), and a L=10 stack costs 20 JPEG decodes.
- raw: flow_x / flow_y (bflow_*) are uint8 arrays of shape (n-1, H, W), one frame per chunk,
  uncompressed. Lossless and the fastest to read; 14x the bytes of jpeg. Why uncompressed (every
  built-in filter inflates slower than JPEG decodes): docs/performance.md.

One frame per chunk: a stack is one read per component, of L consecutive chunks and nothing
outside the stack, straight into a preallocated buffer, then one `cv2.merge` interleaves the 2L
planes into HxWx2L. Readers do not depend on the filter (HDF5 applies it), so a store written
with another one reads the same; meta "flow_storage" records what was used. Checksums are
uint32 datasets crc32_rgb, crc32_flow_x, ... (an attribute holds at most 64 KiB).

A video is written to a temporary file and renamed into place whole. Backward flows added to a
finished video (`BackwardWriter`): the file is copied to a temporary name, the datasets are added
to the copy, and the copy replaces the file when whole: the forward datasets keep their bytes, a
crash leaves the original file as it was, and a trainer reading the file meanwhile keeps reading
the old one. (Adding the datasets in place with h5py's r+ would save the copy, but HDF5 has no
journal: a crash mid-write can leave the whole file, forward flows included, unreadable.)
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from core.atomic import temp_name
from flowprep.store_base import StoreError, VideoReader, VideoWriter, checked_id

NAME = "hdf5"
FLOW_CODECS = ("jpeg", "raw")
MMACTION2 = None  # MMAction2 reads frame files, not HDF5
# Dataset names per frame kind.
H5_NAMES = {"img": "rgb", "flow_x": "flow_x", "flow_y": "flow_y", "bflow_x": "bflow_x", "bflow_y": "bflow_y"}
# Raw flow datasets: no compression filter (docs/performance.md: every built-in one costs more to
# inflate than JPEG costs to decode). A dict of h5py create_dataset keywords.
RAW_FILTER: dict = {}


def path(root: str | Path, video_id: str) -> Path:
    """The video's .h5 file."""
    p = Path(root) / checked_id(video_id)
    return p.with_name(p.name + ".h5")


class Writer(VideoWriter):
    """Writes one video into a temporary .h5 file, appending frame by frame (bounded memory)."""

    format = NAME

    def __init__(self, root: str | Path, video_id: str, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
        import h5py

        if flow_codec not in FLOW_CODECS:
            raise ValueError(f"flow_codec must be one of {FLOW_CODECS}, got {flow_codec!r}")
        super().__init__(jpeg_quality, flow_codec)
        self.final = path(root, video_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.final)
        self.file = h5py.File(self.tmp, "w")
        self.ds = {}
        self._dataset("rgb")
        if flow_codec == "jpeg":  # raw flow datasets need the frame size: made on the first flow
            for name in ("flow_x", "flow_y"):
                self._dataset(name)
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

    def _put(self, kind: str, data: bytes | np.ndarray) -> None:
        name = H5_NAMES[kind]
        raw = isinstance(data, np.ndarray)
        ds = self._dataset(name, data.shape if raw else None)
        n = ds.shape[0]
        if raw and data.shape != ds.shape[1:]:
            raise StoreError(f"a flow field of shape {data.shape} in a video of {ds.shape[1:]} frames")
        ds.resize((n + 1, *ds.shape[1:]))
        ds[n] = data if raw else np.frombuffer(data, np.uint8)
        self.crc.setdefault(name, []).append(zlib.crc32(data))

    def _storage(self) -> dict:
        if self.flow_codec == "jpeg":
            return {"flow_storage": {"layout": "one JPEG per element", "jpeg_quality": self.quality}}
        ds = self.ds.get("flow_x")
        return {"flow_storage": {"layout": "uint8 (n-1, H, W)", "chunks": list(ds.chunks) if ds is not None else None,
                                 "compression": ds.compression if ds is not None else RAW_FILTER.get("compression")}}

    def _write_attrs_and_crcs(self, meta: dict) -> None:
        for k, v in meta.items():
            self.file.attrs[k] = json.dumps(v)  # JSON keeps nested params and types exact
        for name, crcs in self.crc.items():
            self.file.create_dataset(f"crc32_{name}", data=np.array(crcs, np.uint32), track_times=False)

    def _replace_final(self, meta: dict) -> Path:
        self.file.close()
        if self.final.is_dir():
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.final} is in the way of video {meta.get('id', self.final.name)}: a folder, "
                             "not a video file; move it out of the store")
        os.replace(self.tmp, self.final)
        return self.final

    def _finish(self, meta: dict) -> Path:
        self._write_attrs_and_crcs(meta)
        return self._replace_final(meta)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class BackwardWriter(Writer):
    """Adds backward flows to a finished video: a copy of the file gains the datasets and replaces
    it when whole (module docstring). `write_flow(q)` per flow, then `commit(meta changes)`."""

    def __init__(self, root: str | Path, video_id: str):
        import h5py

        self.final = path(root, video_id)
        self.tmp = temp_name(self.final)
        shutil.copyfile(self.final, self.tmp)
        try:
            self.file = h5py.File(self.tmp, "r+")
            self.meta = {k: json.loads(v) for k, v in self.file.attrs.items()}
        except (OSError, ValueError) as e:
            self.tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.final} is not a readable video file: {e}") from e
        VideoWriter.__init__(self, int(self.meta.get("jpeg_quality", 95)), self.meta.get("flow_codec", "jpeg"))
        for name in ("bflow_x", "bflow_y", "crc32_bflow_x", "crc32_bflow_y"):  # none in a whole forward file
            if name in self.file:
                del self.file[name]
        self.ds = {}
        self.flows = int(self.meta["flows"])
        self.crc = {"bflow_x": [], "bflow_y": []}

    def write_flow(self, q: np.ndarray, backward: bool = True) -> None:
        super().write_flow(q, backward=True)

    def commit(self, changes: dict) -> Path:
        meta = dict(self.meta, **changes, bflows=self.bflows)
        self._write_attrs_and_crcs(meta)
        return self._replace_final(meta)


class Reader(VideoReader):
    def __init__(self, root: str | Path, video_id: str):
        import h5py

        p = path(root, video_id)
        if not p.is_file():
            raise StoreError(f"video {video_id} is not in the store {root} (no {p})")
        try:
            self._h5 = h5py.File(p, "r")
        except OSError as e:
            raise StoreError(f"{p} is not a readable HDF5 file: {e}") from e
        self._ds: dict = {}
        super().__init__(video_id, p, {k: json.loads(v) for k, v in self._h5.attrs.items()})

    def _dataset(self, kind: str):
        """The dataset of `kind`, looked up once (a lookup costs about as much as a small read)."""
        ds = self._ds.get(kind)
        if ds is None:
            ds = self._ds[kind] = self._h5[H5_NAMES[kind]]
        return ds

    def frame_label(self, kind: str, i: int) -> str:
        return f"{H5_NAMES[kind]}[{i}]"

    def _bytes(self, kind: str, i: int) -> bytes:
        return self._dataset(kind)[i].tobytes()

    def _encoded(self, kind: str, start: int, length: int) -> list:
        return list(self._dataset(kind)[start:start + length])

    def _planes(self, kx: str, ky: str, start: int, length: int, box) -> np.ndarray:
        if self.flow_codec != "raw":
            return super()._planes(kx, ky, start, length, box)
        dx, dy = self._dataset(kx), self._dataset(ky)
        y, x, h, w = box or (0, 0, *dx.shape[1:])
        src = np.s_[start:start + length, y:y + h, x:x + w]
        out = np.empty((length, 2, h, w), np.uint8)
        # Read each component whole, then interleave: reading into a strided destination
        # takes h5py's element-wise path, 200x slower.
        out[:, 0], out[:, 1] = dx[src], dy[src]
        return out.reshape(2 * length, h, w)

    def checksums(self) -> dict[str, list[int]] | None:
        if "crc32_rgb" not in self._h5:
            return None
        return {k: [int(c) for c in self._h5[f"crc32_{name}"][()]] for k, name in H5_NAMES.items()
                if f"crc32_{name}" in self._h5}

    def count_problem(self, expected: dict[str, int]) -> str | None:
        lens = tuple(self._h5[H5_NAMES[k]].shape[0] if H5_NAMES[k] in self._h5 else 0 for k in expected)
        if lens != tuple(expected.values()):
            return f"attributes say {self.num_frames}/{self.num_flows}/{self.num_bflows} but datasets hold {lens}"
        if self.flow_codec == "raw":
            w, h = self.meta["size"]
            shapes = {self._h5[H5_NAMES[k]].shape[1:] for k in list(expected)[1:] if H5_NAMES[k] in self._h5}
            if shapes - {(h, w)}:
                return f"raw flow planes of shape {sorted(shapes)}, but the video is {w}x{h}"
        return None

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self._ds = {}


def video_ids(root: Path) -> list[str]:
    """Ids of the .h5 files under `root`."""
    ids = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        ids += [(rel / f[:-3]).as_posix().removeprefix("./") for f in filenames
                if f.endswith(".h5") and not f.startswith(".")]
    return ids
