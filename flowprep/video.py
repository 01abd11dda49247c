"""Finding, probing and decoding input videos (OpenCV / FFmpeg), one frame at a time.

Frames are resized before flow is computed (flow is then in pixels of the stored size, as in
denseflow): INTER_AREA when shrinking, which averages instead of aliasing, and INTER_LINEAR when
enlarging. `size=(W, H)` stretches to exactly that size (denseflow's --newWidth/--newHeight, the
usual 340x256); `short_side=N` keeps the aspect ratio.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".flv", ".wmv", ".m4v")
# A container that declares N frames but decodes fewer than this share of them is reported as
# truncated; declared counts are estimates for some containers, so a small shortfall is accepted.
MIN_DECODED_FRACTION = 0.9


class VideoError(Exception):
    """An input video that cannot be used; `reason` says why in words for the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int  # as declared by the container: an estimate for some formats
    width: int
    height: int


def _open(path: str | Path) -> cv2.VideoCapture:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"file not found: {path}")
    if not path.is_file():
        raise VideoError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoError("not a readable video (OpenCV/FFmpeg cannot open it)")
    return cap


def probe(path: str | Path) -> VideoInfo:
    """Container information without decoding; raises VideoError for unusable files."""
    cap = _open(path)
    try:
        info = VideoInfo(fps=float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
                         frames=max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0),
                         width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    finally:
        cap.release()
    if info.width <= 0 or info.height <= 0:
        raise VideoError("no video stream (frame size unknown)")
    return info


def parse_size(text: str) -> tuple[int, int]:
    """'340x256' -> (340, 256)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like WIDTHxHEIGHT, e.g. 340x256; got {text!r}") from None
    if w < 8 or h < 8:
        raise ValueError(f"size must be at least 8x8, got {text!r}")
    return w, h


def target_size(width: int, height: int, size: tuple[int, int] | None = None,
                short_side: int | None = None) -> tuple[int, int]:
    """Output (W, H) for a source of width x height: `size` if given, else short side scaled to
    `short_side` (other side rounded, aspect kept), else unchanged."""
    if size is not None and short_side is not None:
        raise ValueError("give either size or short_side, not both")
    if size is not None:
        return int(size[0]), int(size[1])
    if short_side is not None:
        s = short_side / min(width, height)
        return max(1, round(width * s)), max(1, round(height * s))
    return width, height


def resize(frame: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    h, w = frame.shape[:2]
    if (w, h) == tuple(wh):
        return frame
    shrinking = wh[0] <= w and wh[1] <= h
    return cv2.resize(frame, wh, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_frames(path: str | Path, size: tuple[int, int] | None = None, short_side: int | None = None,
                step: int = 1, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR frames (resized) one at a time, keeping every `step`-th frame (0, step, 2*step, ...).

    Raises VideoError when the file cannot be opened, yields fewer than 2 frames (flow needs a
    pair) or stops decoding well short of the frame count its container declares (truncated or
    corrupt). The error comes when the problem is found, so a caller streaming the frames into a
    store must be ready to abort what it wrote.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if max_frames is not None and max_frames < 2:
        raise ValueError(f"max_frames must be >= 2 (flow needs a pair), got {max_frames}")
    cap = _open(path)
    try:
        declared = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)
        wh = None
        decoded = kept = 0
        while max_frames is None or kept < max_frames:
            if decoded % step == 0:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                if wh is None:
                    wh = target_size(frame.shape[1], frame.shape[0], size, short_side)
                decoded += 1
                kept += 1
                yield resize(frame, wh)
            else:
                if not cap.grab():  # skipped frames are decoded but not converted
                    break
                decoded += 1
        if decoded == 0:
            raise VideoError("no frame decodes (corrupt or unsupported video)")
        if kept < 2:
            raise VideoError(f"only {kept} frame{'s' if kept != 1 else ''} (with step {step}); flow needs at least 2")
        if declared and decoded < MIN_DECODED_FRACTION * declared and (max_frames is None or kept < max_frames):
            raise VideoError(f"truncated or corrupt: decoding stopped after {decoded} of the {declared} frames "
                             "the container declares")
    finally:
        cap.release()


def find_videos(root: str | Path, list_file: str | Path | None = None) -> list[tuple[str, Path]]:
    """(video id, path) pairs, sorted by id. The id is the path relative to `root` without its
    extension, '/'-separated. Without `list_file`, every file under `root` with a video extension
    (any case); with it, one path per line relative to `root` (blank lines and '#' comments skipped;
    a trailing label column, as in UCF-101 trainlist files, is ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder {root} does not exist")
    paths: list[Path] = []
    if list_file is None:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths += [Path(dirpath) / f for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
    else:
        for line in Path(list_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                paths.append(root / line.split()[0])
    videos: dict[str, Path] = {}
    for p in paths:
        vid = p.relative_to(root).with_suffix("").as_posix()
        if vid in videos and videos[vid] != p:
            raise ValueError(f"two videos would get the same id {vid!r}: {videos[vid]} and {p}; rename one")
        videos[vid] = p
    return sorted(videos.items())
