"""What every store format shares: the frame codec, and the writer and reader every format
implements (flowprep/store_jpeg.py, flowprep/store_hdf5.py; flowprep/store.py picks one).

A writer writes one video under a temporary name and puts it in place whole at `commit`
(`abort`, or a `with` block that raises, removes what it wrote): `write_rgb(bgr)` or
`skip_rgb()` per frame, `write_flow(q)` per quantized flow field (HxWx2 uint8, x then y;
`backward=True`: frame i+1 to frame i), then `commit(meta)`. Every stored frame's CRC32 is
taken as it is written. A format implements `_put(kind, data)`, `_finish(meta)`, `abort()`.

A reader gives random access to one stored video (0-based indices; file names are 1-based). A
format implements `_bytes(kind, i)`, `checksums()`, `count_problem(expected)` and `close()`, and may
override `_planes` (a raw-coded HDF5 video reads a region of its planes directly).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from core.ids import id_problem
from core.layout import FLOW_KINDS, frame_name


class StoreError(RuntimeError):
    """A store, or a video in it, is missing, incomplete or unreadable."""


def checked_id(video_id: str) -> str:
    """`video_id`, or StoreError when it is not a clean relative path (core/ids.py): whatever
    asks, nothing outside the store is ever written, replaced or removed through a video id."""
    problem = id_problem(video_id)
    if problem:
        raise StoreError(f"{video_id!r} cannot be a video id: {problem}")
    return video_id


# ---------------------------------------------------------------- the frame codec

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


def crc_hex(crcs: list[int]) -> str:
    """Checksums as meta.json holds them: 8 hex digits per frame, in order."""
    return "".join(f"{c:08x}" for c in crcs)


def crc_list(text: str) -> list[int]:
    return [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]


def merge(planes: list[np.ndarray]) -> np.ndarray:
    """HxW planes -> HxWxC in one pass (cv2.merge: about 3x faster than np.stack's strided copy)."""
    if 2 <= len(planes) <= 512:  # OpenCV's channel limit (CV_CN_MAX)
        return cv2.merge(planes)
    return np.stack(planes, axis=-1)


def plane(q: np.ndarray, c: int) -> np.ndarray:
    """Channel c of an HxWx2 flow field as a contiguous HxW plane."""
    return np.ascontiguousarray(q[..., c])


# ---------------------------------------------------------------- writing

class WholeOrNothing:
    """A write that is whole or nothing: `with` aborts it when the block raises."""

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class VideoWriter(WholeOrNothing):
    """One video's frames, written under a temporary name; `commit` puts the video in place."""

    format = ""

    def __init__(self, jpeg_quality: int = 95, flow_codec: str = "jpeg"):
        self.quality = int(jpeg_quality)
        self.flow_codec = flow_codec
        self.frames = self.flows = self.bflows = self.rgb_written = 0

    def _put(self, kind: str, data: bytes | np.ndarray) -> None:
        """Store frame number `count(kind)` of `kind`: JPEG bytes, or a raw HxW plane."""
        raise NotImplementedError

    def _finish(self, meta: dict) -> Path:
        """Write `meta` with the video and put it in place."""
        raise NotImplementedError

    def write_rgb(self, bgr: np.ndarray) -> None:
        self._put("img", encode_jpeg(bgr, self.quality))
        self.frames += 1
        self.rgb_written += 1

    def skip_rgb(self) -> None:
        """Count a frame without storing it (--no-rgb): `frames` stays the decoded count, flows = frames - 1."""
        self.frames += 1

    def write_flow(self, q: np.ndarray, backward: bool = False) -> None:
        """Write one quantized flow field (HxWx2 uint8, x then y); `backward`: frame i+1 to frame i."""
        for c, kind in enumerate(FLOW_KINDS[backward]):
            self._put(kind, plane(q, c) if self.flow_codec == "raw" else encode_jpeg(q[..., c], self.quality))
        if backward:
            self.bflows += 1
        else:
            self.flows += 1

    def _storage(self) -> dict:
        """Meta keys describing how the format stored the flow (none by default)."""
        return {}

    def commit(self, meta: dict) -> Path:
        """Put the video in place with `meta` (the caller's keys, then the counts and encoding)."""
        return self._finish(dict(meta, frames=self.frames, flows=self.flows, bflows=self.bflows, format=self.format,
                                 encoding="jpeg", flow_codec=self.flow_codec, **self._storage(),
                                 jpeg_quality=self.quality, rgb=self.rgb_written == self.frames, complete=True))


# ---------------------------------------------------------------- reading

class VideoReader:
    """Random access to one stored video. Indices are 0-based (file names are 1-based).

    `rgb(i)` -> HxWx3 uint8 RGB; `flow(i)` -> HxWx2 uint8 (x, y); `flow_stack(i, L)` -> HxWx2L
    uint8 ordered x_i, y_i, x_i+1, y_i+1, ...; `backward=True` reads the backward flows (frame
    i+1 to frame i) of a store extracted with --direction both. `frame_bytes` gives the stored
    bytes: the encoded JPEG (for decoders elsewhere, e.g. torchvision.io.decode_jpeg), or for raw
    flow (`flow_codec == "raw"`) the HxW uint8 plane.
    """

    def __init__(self, video_id: str, path: Path, meta: dict):
        self.video_id, self.path, self.meta = video_id, path, meta
        self.num_frames = int(meta["frames"])
        self.num_flows = int(meta["flows"])
        self.num_bflows = int(meta.get("bflows", 0))
        self.has_rgb = bool(meta.get("rgb", True))  # False: extracted with --no-rgb (flow only)
        self.flow_codec = meta.get("flow_codec", "jpeg")

    # what a format implements
    def _bytes(self, kind: str, i: int) -> bytes:
        raise NotImplementedError

    def checksums(self) -> dict[str, list[int]] | None:
        """kind -> CRC32 of each stored frame's bytes, as written; None for a video stored before
        flowprep recorded them."""
        raise NotImplementedError

    def count_problem(self, expected: dict[str, int]) -> str | None:
        """Whether the stored files (or datasets) hold `expected` frames of each kind, whatever
        meta says; the reason when they do not."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # the shared part
    def count(self, kind: str) -> int:
        """How many frames of `kind` ('img', 'flow_x', ...) the video holds."""
        if kind == "img":
            return self.num_frames if self.has_rgb else 0
        return self.num_bflows if kind.startswith("bflow") else self.num_flows

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

    def frame_bytes(self, kind: str, i: int) -> bytes:
        """Stored bytes of frame i (0-based) of `kind`: a JPEG, or a raw HxW plane (raw flow)."""
        self._check_index(kind, i)
        return self._bytes(kind, i)

    def rgb_bytes(self, i: int) -> bytes:
        return self.frame_bytes("img", i)

    def flow_bytes(self, i: int, backward: bool = False) -> tuple[bytes, bytes]:
        kx, ky = FLOW_KINDS[backward]
        return self.frame_bytes(kx, i), self.frame_bytes(ky, i)

    def frame_label(self, kind: str, i: int) -> str:
        """Where frame i of `kind` is stored, for messages (a file name, or a dataset element)."""
        return frame_name(kind, i)

    def _what(self, kind: str, i: int) -> str:
        return f"{frame_name(kind, i)} of video {self.video_id}"

    def rgb(self, i: int) -> np.ndarray:
        return decode_jpeg(self.rgb_bytes(i), gray=False, what=self._what("img", i))

    def flow(self, i: int, backward: bool = False) -> np.ndarray:
        return self.flow_stack(i, 1, backward)

    def flow_stack(self, start: int, length: int, backward: bool = False) -> np.ndarray:
        """HxWx2L uint8, x_start, y_start, x_start+1, ...: `flow_planes` interleaved (cv2.merge,
        which copies: the result is the caller's)."""
        return merge(list(self.flow_planes(start, length, backward)))

    def flow_planes(self, start: int, length: int, backward: bool = False,
                    box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(2L, h, w) uint8, planes x_start, y_start, x_start+1, ... (the trainer's planar layout),
        of the region box = (y, x, h, w) or the whole frame. Raw-coded HDF5 reads only the region
        (two reads); JPEG decodes whole planes (JPEG cannot do less). A fresh array: the caller may keep it."""
        kx, ky = FLOW_KINDS[backward]
        self._check_index(kx, start, length)
        return self._planes(kx, ky, start, length, box)

    def _encoded(self, kind: str, start: int, length: int) -> list[bytes]:
        """The stored bytes of frames start .. start+length-1 of `kind` (a format may read them at once)."""
        return [self._bytes(kind, start + j) for j in range(length)]

    def _planes(self, kx: str, ky: str, start: int, length: int, box) -> np.ndarray:
        xs, ys = self._encoded(kx, start, length), self._encoded(ky, start, length)
        planes = np.stack([decode_jpeg(d, True, self._what(k, start + j))
                           for j, pair in enumerate(zip(xs, ys)) for k, d in zip((kx, ky), pair)])
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
