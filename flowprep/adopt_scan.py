"""Finding frame folders for `flowprep adopt`: the layouts it reads, and one `Found` per video.

    rawframes   SRC/<class>/<video>/img_00000.jpg, flow_x_00000.jpg / x_00000.jpg, flow_y_ / y_
                (denseflow and MMAction2's build_rawframes: 0-based; yjxiong's TSN: 1-based)
    uv          FLOW_ROOT/u/<video>/frame000001.jpg, FLOW_ROOT/v/<video>/..., RGB (optional) in
                RGB_ROOT/<video>/frame000001.jpg (feichtenhofer's twostreamfusion and the
                repos that reuse its tvl1_flow/ and jpegs_256/ folders)

Per folder, numbered JPEG sequences are detected by prefix, extension, start (0 or 1) and zero
padding; what cannot be adopted as it is becomes the video's `problem` (an odd video), never an
exception out of the scan.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.layout import frame_name

LAYOUTS = ("auto", "rawframes", "uv")
# rawframes prefixes -> store kind (denseflow / MMAction2 write flow_x_, MMAction2's flow template is x_ / y_).
PREFIXES = {"img_": "img", "flow_x_": "flow_x", "x_": "flow_x", "flow_y_": "flow_y", "y_": "flow_y"}
NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<num>\d+)(?P<ext>\.jpe?g)$", re.IGNORECASE)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class Odd(Exception):
    """A video that cannot be adopted as it is; the message says why."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when `data` does not start as a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA:  # image data before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def whole_jpeg(data: bytes) -> bool:
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"  # some encoders pad after EOI


@dataclass
class Frames:
    """One numbered sequence of JPEGs in a folder (prefix + number + extension)."""

    folder: Path
    prefix: str
    ext: str
    names: dict[int, str]  # number -> file name

    @property
    def start(self) -> int:
        return min(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def template(self) -> str:
        widths = {len(NUMBERED.match(n)["num"]) for n in self.names.values()}
        padded = any(NUMBERED.match(n)["num"].startswith("0") and len(NUMBERED.match(n)["num"]) > 1
                     for n in self.names.values())
        if len(widths) == 1 and (padded or len(self.names) == 1):
            return f"{self.prefix}{{:0{widths.pop()}d}}{self.ext}"
        if not padded:
            return f"{self.prefix}{{:d}}{self.ext}"
        raise Odd(f"{self.folder}: {self.prefix}N{self.ext} files mix zero-padded widths {sorted(widths)}")

    def naming(self) -> str:
        return f"{self.template()} from {self.start}"

    def problem(self) -> str | None:
        nums = sorted(self.names)
        first, last = nums[0], nums[-1]
        what = f"{self.folder}/{self.prefix}N{self.ext}"
        if first not in (0, 1):
            return f"{what} starts at {first}, neither 0 nor 1 (frames missing at the start?)"
        if last - first + 1 != len(nums):
            missing = sorted(set(range(first, last + 1)) - set(nums))
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            return f"gaps in the numbering of {what}: {len(missing)} missing ({shown})"
        try:
            self.template()
        except Odd as e:
            return str(e)
        return None

    def paths(self) -> list[Path]:
        return [self.folder / self.names[k] for k in sorted(self.names)]


def numbered(folder: Path) -> dict[tuple[str, str], Frames]:
    """Numbered JPEG sequences in a folder, by (prefix, extension)."""
    groups: dict[tuple[str, str], Frames] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return groups
    for entry in entries:
        m = NUMBERED.match(entry.name)
        if m and not entry.name.startswith(".") and entry.is_file():
            key = (m["prefix"], m["ext"])
            groups.setdefault(key, Frames(folder, m["prefix"], m["ext"], {})).names[int(m["num"])] = entry.name
    return groups


@dataclass
class Found:
    """A video found in SRC: its id, its sequences per store kind, or why it is odd."""

    video_id: str
    layout: str
    folder: Path  # the source folder named in the manifest
    frames: dict[str, Frames] = field(default_factory=dict)  # kind -> sequence
    problem: str | None = None


# UCF-101 video names carry their class: v_<Class>_g<group>_c<clip>.
UCF_NAME = re.compile(r"^v_(?P<class>[A-Za-z0-9]+)_g\d+_c\d+$")
NO_CLASS = "has no class folder"  # the start of a flat video's problem when its class is unknown


class Classes:
    """The class of each video folder: its first folder when it has one (<class>/<video>); for a
    flat name, the group 'class' (else 1) of --class-regex, else the class its split files list
    it under (--splits), else the class a UCF-101 name carries (v_Class_g01_c01)."""

    def __init__(self, regex: re.Pattern | None = None, by_name: dict[str, str] | None = None, infer: bool = True):
        self.regex, self.by_name, self.infer = regex, by_name or {}, infer
        self.inferred: dict[str, int] = {}  # how -> flat names it gave a class

    def _from(self, how: str, cls: str, rel: str) -> str:
        self.inferred[how] = self.inferred.get(how, 0) + 1
        return f"{cls}/{rel}"

    def id_of(self, rel: str) -> str:
        """The video id of the folder `rel` (its path inside the scanned root)."""
        if "/" in rel or not self.infer:
            return rel
        if self.regex is not None:
            m = self.regex.search(rel)
            if not m:
                raise Odd(f"{rel} does not match --class-regex {self.regex.pattern!r}, so its class is unknown")
            cls = m.groupdict().get("class") or (m.group(1) if m.groups() else m.group(0))
            return self._from(f"--class-regex {self.regex.pattern!r}", cls, rel)
        if rel in self.by_name:
            return self._from("the --splits files", self.by_name[rel], rel)
        m = UCF_NAME.match(rel)
        if m:
            return self._from("their UCF-101 names (v_<Class>_gNN_cNN)", m["class"], rel)
        why = "is in none of the --splits files" if self.by_name else "names no class the way UCF-101 names do"
        raise Odd(f"{rel} {NO_CLASS} and {why}: give --class-regex (the class's part of the name) or --splits "
                  "(the dataset's split files, which list each video under its class)")


def _walk(root: Path, skip: Path | None) -> list[tuple[str, Path]]:
    """(relative path, folder) of every folder under `root` holding numbered JPEGs; not below those."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip))
        if any(NUMBERED.match(f) for f in filenames if not f.startswith(".")) and here != root:
            found.append((here.relative_to(root).as_posix(), here))
            dirnames[:] = []
    return found


def scan_rawframes(src: Path, skip: Path | None = None, classes: Classes = Classes()) -> list[Found]:
    videos = []
    for rel, folder in _walk(src, skip):
        found = Found(rel, "rawframes", folder)
        try:
            found.video_id = classes.id_of(rel)
            groups = numbered(folder)
            for (prefix, ext), seq in sorted(groups.items()):
                kind = PREFIXES.get(prefix)
                if kind is None:
                    continue
                if kind in found.frames:
                    raise Odd(f"{folder} holds both {found.frames[kind].prefix}N and {prefix}N files for {kind}")
                found.frames[kind] = seq
            if not found.frames:
                names = ", ".join(sorted(f"{p}N{e}" for p, e in groups))
                raise Odd(f"{folder} holds numbered JPEGs ({names}) but none named img_, flow_x_ / x_ or "
                          "flow_y_ / y_ (for FLOW/u/<video> and FLOW/v/<video> folders use --layout uv)")
        except Odd as e:
            found.problem = str(e)
        videos.append(found)
    return videos


def _single(folder: Path) -> Frames | None:
    groups = numbered(folder)
    if len(groups) > 1:
        names = ", ".join(sorted(f"{p}N{e}" for p, e in groups))
        raise Odd(f"{folder} holds more than one numbered sequence ({names})")
    return next(iter(groups.values()), None)


def scan_uv(flow_root: Path, rgb_root: Path | None, classes: Classes = Classes()) -> list[Found]:
    rels = {rel for sub in ("u", "v") for rel, _ in _walk(flow_root / sub, None)}
    videos = []
    for rel in sorted(rels):
        found = Found(rel, "uv", flow_root / "u" / rel)
        try:
            found.video_id = classes.id_of(rel)
            for kind, folder in (("flow_x", flow_root / "u" / rel), ("flow_y", flow_root / "v" / rel),
                                 ("img", rgb_root / rel if rgb_root else None)):
                if folder is None:
                    continue
                seq = _single(folder) if folder.is_dir() else None
                if seq is None:
                    raise Odd(f"no frames in {folder} ({'RGB' if kind == 'img' else 'the ' + kind[-1] + ' flow'} of "
                              f"{rel})")
                found.frames[kind] = seq
        except Odd as e:
            found.problem = str(e)
        videos.append(found)
    return videos



def fits_in_place(found: Found) -> bool:
    """Whether the video's files already have the store's names and place (1-based img_/flow_x_/flow_y_)."""
    if found.layout != "rawframes":
        return False
    want = {"img": "img_", "flow_x": "flow_x_", "flow_y": "flow_y_"}
    return all(seq.prefix == want[kind] and seq.ext == ".jpg" and seq.start == 1 and
               all(seq.names[k] == frame_name(kind, k - 1) for k in seq.names)
               for kind, seq in found.frames.items())


def find_uv(src: Path) -> Path | None:
    """The folder holding u/ and v/ flow folders: SRC itself, or one folder below it (the
    downloads' tvl1_flow/ beside jpegs_256/); None when there is none (or more than one below)."""
    def holds(d: Path) -> bool:
        return (d / "u").is_dir() and (d / "v").is_dir()
    if holds(src):
        return src
    below = [d for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith(".") and holds(d)]
    return below[0] if len(below) == 1 else None


def find_rgb_beside(src: Path, flow_root: Path) -> Path | None:
    """The folder of RGB frame folders beside a u/ v/ flow root (jpegs_256/ beside tvl1_flow/):
    the sibling that holds most of the flow's video folders by name (None: no sibling holds any)."""
    names = {d.name for d in (flow_root / "u").iterdir() if d.is_dir()}
    best, overlap = None, 0
    for d in sorted(src.iterdir()):
        if d == flow_root or not d.is_dir() or d.name.startswith("."):
            continue
        n = len(names & {e.name for e in d.iterdir() if e.is_dir()})
        if n > overlap:
            best, overlap = d, n
    return best
