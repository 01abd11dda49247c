"""Finding, probing and decoding input videos (OpenCV / FFmpeg), one frame at a time.

Finding (`scan_videos`): a video's id is its path inside --videos without the extension, each run
of whitespace made one '_' (`core.ids.id_from_path`: `IMG 0001.MOV` -> `IMG_0001`; the manifest
keeps the source path); the id names its place in the store, so every id must be a clean relative
path (`core.ids.id_problem`: no '..', not absolute, no hidden parts). Files with another extension
are left out, with a note (an animated .gif). Symbolic links inside --videos are followed
and may point anywhere (reading is harmless); what makes the id is the path inside --videos, never
the link's target, so nothing can be written outside the store through a link either. A folder is
searched once, by real path, so a link loop (`A/self -> .`) or a second name for a folder ends
the descent; a file reached under two names is extracted once. Both are reported. Ids that would
collide in a store (`A/v` and `A/v/w`: the folder of one holds the other) are refused up front.
All these problems are reported together, before anything runs.

Truncated sources (`FrameReader`): a file cut short still opens and declares its full frame count,
then decoding stops early, and the last frame FFmpeg returns is typically damaged (it decodes from
the bytes up to the cut: measured on an MJPG .avi cut by 9%, 37 of 40 frames and the 37th off by
up to 116 grey levels). OpenCV reports no decoder error to Python, so the reader holds each frame
back until the next one has decoded: when decoding stops short of the declared count, the last
decoded frame is dropped and the video is marked partial (declared / decoded counts recorded).
Containers whose count is only an estimate (some .mkv / .webm) may thus lose one good frame and
show as partial; a frame is cheap, a garbage frame in training is not. Below
MIN_DECODED_FRACTION of the declared count the video fails as truncated.

Frames are resized before flow is computed (flow is then in pixels of the stored size, as in
denseflow): INTER_AREA when shrinking, which averages instead of aliasing, and INTER_LINEAR when
enlarging. `size=(W, H)` stretches to exactly that size (denseflow's --newWidth/--newHeight, the
usual 340x256); `short_side=N` keeps the aspect ratio.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from core.ids import id_from_path, id_problem

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
    # OpenCV says only "cannot open" whatever the cause: open the file ourselves first to tell.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise VideoError(f"permission denied: cannot read {path} (give the user running the job read access, "
                         "e.g. chmod a+r)") from None
    except OSError as e:
        raise VideoError(f"cannot read {path}: {e.strerror or e}") from None
    # OpenCV prints its own warning for a file it cannot open; the reason goes in our record instead.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        cv2.utils.logging.setLogLevel(level)
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


class FrameReader:
    """Iterate BGR frames (resized) one at a time, keeping every `step`-th frame (0, step, 2*step, ...);
    after the loop `declared`, `decoded`, `frames` and `partial` say what happened.

    Raises VideoError (during iteration) when the file cannot be opened, yields fewer than 2
    frames (flow needs a pair) or stops decoding well short of the frame count its container
    declares. A smaller shortfall makes the video `partial`: the last decoded frame is not
    yielded (see the module docstring). The error comes when the problem is found, so a caller
    streaming the frames into a store must be ready to abort what it wrote.
    """

    def __init__(self, path: str | Path, size: tuple[int, int] | None = None, short_side: int | None = None,
                 step: int = 1, max_frames: int | None = None):
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if max_frames is not None and max_frames < 2:
            raise ValueError(f"max_frames must be >= 2 (flow needs a pair), got {max_frames}")
        self.path, self.size, self.short_side, self.step, self.max_frames = path, size, short_side, step, max_frames
        self.declared = 0  # frame count the container declares (0: unknown)
        self.decoded = 0  # frames the decoder returned, kept or skipped
        self.frames = 0  # frames yielded
        self.partial = False  # decoding stopped short of `declared`; the last decoded frame was dropped

    def __iter__(self) -> Iterator[np.ndarray]:
        cap = _open(self.path)
        try:
            self.declared = declared = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)
            wh = None
            held = None  # the latest kept frame, yielded once the decoder got past it
            kept = 0
            last_kept = False  # was the last decoded frame a kept one?
            limited = False
            while True:
                if self.max_frames is not None and kept >= self.max_frames:
                    limited = True
                    break
                if self.decoded % self.step == 0:
                    ok, frame = cap.read()
                    if not ok or frame is None:
                        break
                    if wh is None:
                        wh = target_size(frame.shape[1], frame.shape[0], self.size, self.short_side)
                    self.decoded += 1
                    kept += 1
                    last_kept = True
                    if held is not None:
                        self.frames += 1
                        yield held
                    held = resize(frame, wh)
                else:
                    if not cap.grab():  # skipped frames are decoded but not converted
                        break
                    self.decoded += 1
                    last_kept = False
            if self.decoded == 0:
                raise VideoError("no frame decodes (corrupt or unsupported video)")
            short = bool(declared) and self.decoded < declared and not limited
            if short and self.decoded < MIN_DECODED_FRACTION * declared:
                raise VideoError(f"truncated or corrupt: decoding stopped after {self.decoded} of the {declared} "
                                 "frames the container declares")
            if short and last_kept:
                held = None  # decoded from the bytes up to the cut: not to be trusted
                kept -= 1
            self.partial = short
            if kept < 2:
                raise VideoError(f"only {kept} frame{'s' if kept != 1 else ''} (with step {self.step}"
                                 + (", after dropping the last frame of a cut file" if short else "")
                                 + "); flow needs at least 2")
            if held is not None:
                self.frames += 1
                yield held
        finally:
            cap.release()

    def describe(self) -> str:
        """What a partial read lost, for the manifest."""
        return (f"decoding stopped after {self.decoded} of the {self.declared} frames the container declares "
                "(file cut short?); the last decoded frame was dropped")


def read_frames(path: str | Path, size: tuple[int, int] | None = None, short_side: int | None = None,
                step: int = 1, max_frames: int | None = None) -> FrameReader:
    """The frames of a video, one at a time (see FrameReader)."""
    return FrameReader(path, size, short_side, step, max_frames)


class VideoListError(ValueError):
    """Videos that cannot be extracted as found or listed; the message names every one and why."""


@dataclass
class VideoScan:
    """What `scan_videos` found: (id, path) pairs sorted by id, and notes on what it skipped."""

    videos: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # duplicates: "A/self: the same folder as A ..."


# Files that are plainly not meant as videos (split lists, notes, metadata): skipped without a note.
NOT_MEDIA = (".txt", ".json", ".jsonl", ".csv", ".md", ".toml", ".yaml", ".yml", ".xml", ".log", ".py", ".sh")


def _is_video(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _skipped_note(skipped: dict[str, int]) -> str:
    """A note on the files left out for their extension (an animated .gif, stills, unknown
    containers), so nothing a user meant as a video disappears silently."""
    shown = ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return (f"{sum(skipped.values())} files skipped for their extension ({shown}): flowprep reads "
            f"{' '.join(VIDEO_EXTENSIONS)}; convert others to one of those (e.g. ffmpeg -i in.gif out.mp4)")


def _walk(root: Path, notes: list[str]) -> list[tuple[str, Path, bool]]:
    """(path inside root, path, reached through a link) of every video file; each real folder once.

    Breadth first, the real tree before symlinked folders, so a folder's own name wins over a
    link's, and a loop or a second name for a folder is searched no further (a note says so).
    """
    seen: dict[str, str] = {}  # real path -> name inside root it was searched under
    found: list[tuple[str, Path, bool]] = []
    skipped: dict[str, int] = {}  # extension -> files left out for it
    real_queue: deque[tuple[str, bool]] = deque([("", False)])
    link_queue: deque[tuple[str, bool]] = deque()
    while real_queue or link_queue:
        rel, via_link = real_queue.popleft() if real_queue else link_queue.popleft()
        path = root / rel if rel else root
        real = os.path.realpath(path)
        if real in seen:
            first = seen[real] or "."
            loop = rel.startswith(seen[real] + "/") or not seen[real]
            notes.append(f"{rel}: the same folder as {first} ({'a symlink loop' if loop else 'another name for it'});"
                         " searched once")
            continue
        seen[real] = rel
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            notes.append(f"{rel or '.'}: cannot be listed ({e.strerror or e}); skipped")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                link = entry.is_symlink()
                (link_queue if link else real_queue).append((child, via_link or link))
            elif _is_video(entry.name):
                found.append((child, Path(entry.path), via_link or entry.is_symlink()))
            else:
                ext = os.path.splitext(entry.name)[1].lower()
                if ext not in NOT_MEDIA:
                    skipped[ext] = skipped.get(ext, 0) + 1
    if skipped:
        notes.append(_skipped_note(skipped))
    return found


def _read_list(root: Path, list_file: Path, problems: list[str]) -> list[tuple[str, Path, bool]]:
    found = []
    for n, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        rel = token.replace("\\", "/")
        if os.path.isabs(rel):
            problems.append(f"{list_file}:{n}: {token!r} is an absolute path; lines must be paths relative to "
                            f"--videos ({root})")
            continue
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            problems.append(f"{list_file}:{n}: {token!r} has a '..' part; lines must be paths relative to --videos "
                            f"({root}) without '..' (a video outside it has no place in the store)")
            continue
        rel = "/".join(parts)
        found.append((rel, root / rel, False))
    return found


def scan_videos(root: str | Path, list_file: str | Path | None = None) -> VideoScan:
    """The videos under `root` (or those `list_file` names), checked up front.

    The id is the path relative to `root` without its extension, '/'-separated. Without
    `list_file`, every file under `root` with a video extension (any case), links followed
    (see the module docstring); with it, one path per line relative to `root` (blank lines and
    '#' comments skipped; a trailing label column, as in UCF-101 trainlist files, is ignored).
    Raises VideoListError naming every entry that cannot be extracted (an id outside `root`,
    a name list files cannot hold, two ids that collide in a store), so nothing runs until the
    input is fixed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"videos folder {root} does not exist")
    scan = VideoScan()
    problems: list[str] = []
    entries = _walk(root, scan.notes) if list_file is None else _read_list(root, Path(list_file), problems)

    # One id per real file: the file's own name (not a link) first, then the first reached.
    by_real: dict[str, list[tuple[str, Path, bool]]] = {}
    for rel, path, via_link in entries:
        by_real.setdefault(os.path.realpath(path), []).append((rel, path, via_link or path.is_symlink()))
    videos: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for group in by_real.values():
        names = list(dict.fromkeys(g[0] for g in group))  # the same line twice is no duplicate
        group = sorted({g[0]: g for g in group}.values(), key=lambda g: (g[2], names.index(g[0])))
        rel, path, _ = group[0]
        vid = id_from_path(rel)
        for other, _, _ in group[1:]:
            scan.notes.append(f"{id_from_path(other)}: the same file as {vid}; extracted once, "
                              f"as {vid}")
        if vid in videos:
            problems.append(f"{sources[vid]} and {rel} would both get the id {vid!r}; rename one")
            continue
        videos[vid] = path
        sources[vid] = rel
    for vid in sorted(videos):
        problem = id_problem(vid)
        if problem:
            problems.append(f"{vid!r} ({sources[vid]!r}): {problem}; rename it")
    ids = set(videos)
    for vid in sorted(ids):
        parts = vid.split("/")
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if parent in ids:
                problems.append(f"{sources[parent]} and {sources[vid]}: in a store the folder of video {parent!r} "
                                f"would hold video {vid!r}; rename or move one of them")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise VideoListError(f"{len(problems)} of the videos {'listed' if list_file else 'found'} cannot be "
                             f"extracted:\n  {shown}")
    scan.videos = sorted(videos.items())
    return scan


def find_videos(root: str | Path, list_file: str | Path | None = None) -> list[tuple[str, Path]]:
    """(video id, path) pairs sorted by id: `scan_videos(...).videos`."""
    return scan_videos(root, list_file).videos


# ---------------------------------------------------------------- noticing a changed source

_SAMPLE = 1 << 16  # bytes hashed at each end of a source


def fingerprint(path: str | Path) -> dict:
    """What identifies a source file's content cheaply: size, modification time, and a SHA-1 of
    its first and last 64 KiB (recorded with every stored video)."""
    path = Path(path)
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha1": _sample_hash(path, st.st_size)}


def _sample_hash(path: Path, size: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > _SAMPLE:
            f.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def source_changed(recorded: dict | None, path: str | Path) -> str | None:
    """Why the source at `path` is not the one a stored video was made from (None: the same, or
    not known: a store from before fingerprints were kept). Size first; when only the time
    differs (a copy, a touch), the sampled bytes decide, so a copied dataset is not redone."""
    if not recorded:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None  # a missing source fails its own way when it is redone; here it is not our concern
    if st.st_size != recorded.get("size"):
        return f"its source now has {st.st_size} bytes, {recorded.get('size')} when it was extracted"
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    try:
        if _sample_hash(Path(path), st.st_size) != recorded.get("sample_sha1"):
            return "its source's content changed since it was extracted (same size, other bytes)"
    except OSError:
        return None
    return None
