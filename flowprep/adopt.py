"""`flowprep adopt`: a store from frames and flows extracted elsewhere, without recomputing anything.

Layouts read (detected per video: prefixes, 0- or 1-based numbering, zero padding)::

    rawframes   SRC/<class>/<video>/img_00000.jpg, flow_x_00000.jpg / x_00000.jpg, flow_y_ / y_
                (denseflow and MMAction2's build_rawframes: 0-based; yjxiong's TSN: 1-based)
    uv          FLOW_ROOT/u/<video>/frame000001.jpg, FLOW_ROOT/v/<video>/..., RGB (optional) in
                RGB_ROOT/<video>/frame000001.jpg (feichtenhofer's twostreamfusion and the
                repos that reuse its tvl1_flow/ and jpegs_256/ folders)

Where the names already are the store's (1-based img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg
in <class>/<video>/) and --out is SRC (the default), the store is made in place: only store.json,
meta.json per video, manifest.jsonl, expected.json and the list files are written. Otherwise the
store is built at --out with the store's names by hard links (the default: no bytes copied, same
file system needed; the job stops before anything is written if links are impossible), or copies
(--copy, explicit, as it takes the space again), or moves (--move: links, and the source name is
removed only once its video is committed, and only where it is the same file as the store's). A
source is never deleted otherwise, and never copied silently.

Counts are kept as they are, within the store's rule flows = frames - 1: a video with more frames
than flows + 1 (tsn-pytorch's extraction writes n frames and n - 2 flows) keeps its first flows + 1
frames, and one with too few frames keeps its first frames - 1 flows; what is left out is named
in meta "left_out" and the video is recorded "partial" with a warning (listed, trained on, and
shown by extract's and verify's summaries). In place, the left-out files stay in the folder and
meta "extra_files" counts them for `Store.check`. A video without flow is a "frames only" odd one;
one without RGB frames is adopted flow only (meta "rgb" false, as `extract --no-rgb`).

Odd videos are reported (manifest status "failed" with the reason, the summary, exit 1) and the
rest adopted: no flow, gaps in the numbering, numbering from neither 0 nor 1, x/y counts that
differ, mixed zero padding, a file that is not a whole JPEG (checked: SOI, a frame header with the
size, EOI), frames of another size than the first one's, names the store cannot hold.

Every file is read once, for its CRC32 (recorded in meta.json as the writers do, so `flowprep
verify` checks it) and its JPEG header; only the first RGB and the first flow frame are decoded (the
frame size). The flow bound and quantization cannot be read from JPEGs: `--bound` is recorded as
given (store.json and meta "bound"), and the flow parameters as unknown ("algo" null). store.json,
meta.json and the manifest record "adopted_from", the layout, and per video the naming found and
the source folders. The trainer reads an adopted store as any other. A second run resumes: videos
whose adopted copy passes `Store.check` are skipped.
"""
from __future__ import annotations

import errno as errnos
import os
import re
import shlex
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import cv2
import numpy as np

from flowprep.lists import MMACTION2, SplitsError, read_splits, sorted_labels, write_lists
from flowprep.lock import StoreLock, StoreLocked
from flowprep.quant import DEFAULT_BOUND
from flowprep.store import (DONE, LISTING_KEYS, META, STOP_ERRNOS, STORE_INFO, Store, StoreError, add_expected,
                            append_manifest, commit_folder, crc_hex, frame_name, id_problem, os_error_sentence,
                            read_manifest, read_store_info, video_class, video_path, write_json_atomic,
                            write_list_file, write_store_info)
from twostream.atomic import remove_temps, temp_name
from twostream.progress import Progress

LAYOUTS = ("auto", "rawframes", "uv")
MODES = ("link", "copy", "move")
STORE_VERSION = 1
# rawframes prefixes -> store kind (denseflow / MMAction2 write flow_x_, MMAction2's flow template is x_ / y_).
PREFIXES = {"img_": "img", "flow_x_": "flow_x", "x_": "flow_x", "flow_y_": "flow_y", "y_": "flow_y"}
NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<num>\d+)(?P<ext>\.jpe?g)$", re.IGNORECASE)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class AdoptError(Exception):
    """A problem with the job as a whole (SRC not a frame folder, links impossible, another store at --out)."""


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


def _whole_jpeg(data: bytes) -> bool:
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


def _class_id(rel: str, class_regex: re.Pattern | None) -> str:
    """The video id: `rel`, or for a flat name with --class-regex, <class>/<name>."""
    if class_regex is None or "/" in rel:
        return rel
    m = class_regex.search(rel)
    if not m:
        raise Odd(f"{rel} does not match --class-regex {class_regex.pattern!r}, so its class is unknown")
    cls = m.groupdict().get("class") or (m.group(1) if m.groups() else m.group(0))
    return f"{cls}/{rel}"


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


def scan_rawframes(src: Path, skip: Path | None = None, class_regex: re.Pattern | None = None) -> list[Found]:
    videos = []
    for rel, folder in _walk(src, skip):
        found = Found(rel, "rawframes", folder)
        try:
            found.video_id = _class_id(rel, class_regex)
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


def scan_uv(flow_root: Path, rgb_root: Path | None, class_regex: re.Pattern | None = None) -> list[Found]:
    rels = {rel for sub in ("u", "v") for rel, _ in _walk(flow_root / sub, None)}
    videos = []
    for rel in sorted(rels):
        found = Found(rel, "uv", flow_root / "u" / rel)
        try:
            found.video_id = _class_id(rel, class_regex)
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


# ---------------------------------------------------------------- one video

def fits_in_place(found: Found) -> bool:
    """Whether the video's files already have the store's names and place (1-based img_/flow_x_/flow_y_)."""
    if found.layout != "rawframes":
        return False
    want = {"img": "img_", "flow_x": "flow_x_", "flow_y": "flow_y_"}
    return all(seq.prefix == want[kind] and seq.ext == ".jpg" and seq.start == 1 and
               all(seq.names[k] == frame_name(kind, k - 1) for k in seq.names)
               for kind, seq in found.frames.items())


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:4])
    return shown + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _plan(found: Found) -> tuple[int, int, bool, dict[str, int], str | None]:
    """(frames, flows, rgb, left out per kind, warning) within flows = frames - 1."""
    fx, fy, img = found.frames.get("flow_x"), found.frames.get("flow_y"), found.frames.get("img")
    if fx is None and fy is None:
        raise Odd(f"no flow: only {len(img) if img else 0} RGB frames in {found.folder}")
    if fx is None or fy is None:
        have, lack = ("x", "y") if fx else ("y", "x")
        raise Odd(f"{have} flow but no {lack} flow in {found.folder}")
    for seq in (img, fx, fy):
        problem = seq.problem() if seq else None
        if problem:
            raise Odd(problem)
    if len(fx) != len(fy):
        raise Odd(f"{len(fx)} x flows but {len(fy)} y flows ({fx.folder})")
    flows = len(fx)
    if img is None:
        return flows + 1, flows, False, {}, None
    n = len(img)
    if n < 2:
        raise Odd(f"only {n} RGB frame but {flows} flows ({img.folder})")
    if n == flows + 1:
        return n, flows, True, {}, None
    if n > flows + 1:
        extra = n - flows - 1
        return flows + 1, flows, True, {"img": extra}, (
            f"{n} frames but {flows} flows (the last {'flow is' if extra == 1 else f'{extra} flows are'} missing): "
            f"stored {flows + 1} frames, {_names(img.paths()[flows + 1:])} left out")
    extra = flows - (n - 1)
    return n, n - 1, True, {"flow_x": extra, "flow_y": extra}, (
        f"{n} frames but {flows} flows: stored {n - 1} flows, {_names(fx.paths()[n - 1:] + fy.paths()[n - 1:])} "
        "left out")


def _read_all(found: Found, keep: dict[str, int]) -> tuple[dict[str, list[int]], list[int]]:
    """CRC32 per kept file, checking each is a whole JPEG of one size; returns (crcs, [w, h])."""
    size = None
    crcs: dict[str, list[int]] = {}
    for kind in ("img", "flow_x", "flow_y"):
        seq = found.frames.get(kind)
        if seq is None:
            continue
        crcs[kind] = []
        for i, path in enumerate(seq.paths()[:keep[kind]]):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise Odd(f"{path} cannot be read: {e.strerror or e}") from None
            wh = jpeg_size(data)
            if wh is None or not _whole_jpeg(data):
                raise Odd(f"{path} is not a readable JPEG ({'no frame header' if wh is None else 'truncated'})")
            if i == 0:  # one decode per kind: what a reader will see
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                if img is None:
                    raise Odd(f"{path} does not decode (corrupt JPEG)")
                wh = (img.shape[1], img.shape[0])
            if size is None:
                size = wh
            elif wh != size:
                first = found.frames.get("img") or found.frames["flow_x"]
                raise Odd(f"{path} is {wh[0]}x{wh[1]} but {first.paths()[0].name} is {size[0]}x{size[1]}: one video "
                          "has one frame size in a store")
            crcs[kind].append(zlib.crc32(data))
    return crcs, list(size)


@dataclass
class Job:
    src: Path
    out: Path
    mode: str  # "in place", "link", "copy", "move"
    info: dict


def _place(job: Job, source: Path, dest: Path) -> None:
    if job.mode == "copy":
        shutil.copyfile(source, dest)
    else:  # link, move (links now, source names removed after the commit)
        os.link(source, dest)


def _finish_move(meta: dict, final: Path) -> None:
    """--move: remove the source names of a committed video where they are the store's files."""
    for kind, src in (meta.get("sources") or {}).items():
        folder = Path(src["folder"])
        for i in range(src["count"]):
            name = src["template"].format(src["start"] + i)
            source = folder / name
            try:
                if os.path.samefile(source, final / frame_name(kind, i)):
                    source.unlink()
            except FileNotFoundError:
                pass
        try:
            folder.rmdir()  # only when now empty
        except OSError:
            pass


def adopt_video(job: Job, found: Found) -> dict:
    """Adopt one video; returns its manifest record (status ok / partial / failed with the reason)."""
    t0 = time.perf_counter()
    rec = {"id": found.video_id, "label": video_class(found.video_id), "source": str(found.folder),
           "adopted_from": str(job.src), "layout": found.layout, "bflows": 0, "declared_frames": None,
           "decoded_frames": None, "errno": None, "warning": None, "error": None}
    tmp = None
    try:
        if found.problem:
            raise Odd(found.problem)
        problem = id_problem(found.video_id)
        if problem:
            raise Odd(f"{found.video_id!r} cannot name a video in a store: {problem}")
        if job.mode == "in place" and not fits_in_place(found):
            raise Odd(f"its names ({', '.join(s.naming() for s in found.frames.values())}) are not the store's "
                      "(1-based img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg): adopt into another folder with "
                      "--out DIR (hard links, no copies)")
        frames, flows, rgb, left, warning = _plan(found)
        keep = {"img": frames, "flow_x": flows, "flow_y": flows}
        crcs, size = _read_all(found, keep)
        sources = {k: {"folder": str(s.folder), "template": s.template(), "start": s.start, "count": keep[k]}
                   for k, s in found.frames.items()}
        left_out = {k: [p.name for p in found.frames[k].paths()[keep[k]:]] for k, n in left.items()}
        meta = {**job.info, "id": found.video_id, "label": video_class(found.video_id), "source": str(found.folder),
                "layout": found.layout, "naming": {k: s.naming() for k, s in found.frames.items()},
                "sources": sources, "size": size, "frames": frames, "flows": flows, "bflows": 0, "rgb": rgb,
                "format": "jpeg", "encoding": "jpeg", "flow_codec": "jpeg", "complete": True,
                "crc32": {k: crc_hex(crcs.get(k, [])) for k in ("img", "flow_x", "flow_y")},
                "source_counts": {k: len(s) for k, s in found.frames.items()}, "left_out": left_out,
                "partial": warning is not None, "warning": warning, "declared_frames": None, "decoded_frames": None}
        final = video_path(job.out, found.video_id, "jpeg")
        if job.mode == "in place":
            meta["extra_files"] = left
            write_json_atomic(final / META, meta)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_symlink() or final.is_file():
                raise Odd(f"{final} is in the way (not a video folder); move it out of the store")
            tmp = temp_name(final)
            tmp.mkdir()
            for kind, seq in found.frames.items():
                for i, path in enumerate(seq.paths()[:keep[kind]]):
                    _place(job, path, tmp / frame_name(kind, i))
            commit_folder(tmp, final, meta)
            tmp = None
            if job.mode == "move":
                _finish_move(meta, final)
        rec.update(status="partial" if warning else "ok", frames=frames, flows=flows, size=size, warning=warning,
                   naming=meta["naming"])
    except Odd as e:
        rec.update(status="failed", frames=0, flows=0, size=None, error=str(e))
    except OSError as e:
        rec.update(status="failed", frames=0, flows=0, size=None, error=os_error_sentence(e, job.out),
                   errno=errnos.errorcode[e.errno] if e.errno in STOP_ERRNOS else None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# ---------------------------------------------------------------- the job

@dataclass
class AdoptSummary:
    out: Path
    mode: str = "link"
    layout: str = ""
    total: int = 0
    adopted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    odd: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    frames: int = 0
    flows: int = 0
    seconds: float = 0.0
    stopped: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.odd or self.stopped else 0

    def format(self) -> str:
        how = {"in place": "in place", "link": "hard links", "copy": "copies", "move": "moved"}[self.mode]
        lines = [f"{self.total} videos: {len(self.adopted)} adopted, {len(self.odd)} odd, {len(self.skipped)} already "
                 f"adopted (skipped); {self.frames} frames and {self.flows} flows ({self.layout} layout, {how}) in "
                 f"{self.seconds:.1f} s", f"store: {self.out}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  PARTIAL {vid}: {why}" for vid, why in sorted(self.partial.items())]
        lines += [f"  ODD {vid}: {why}" for vid, why in sorted(self.odd.items())]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        return "\n".join(lines)


def _resolve(src: Path, path: str | Path | None) -> Path | None:
    return None if path is None else (src / path).absolute()


def _check_store(out: Path, src: Path, bound: float) -> dict:
    """The adopted store's recorded settings (empty when new); raises for a store made otherwise."""
    try:
        old = read_store_info(out)
    except StoreError:
        if (out / STORE_INFO).is_file():
            raise AdoptError(f"{out / STORE_INFO} is damaged; remove it (or use another --out) to adopt again") from None
        return {}
    if not old.get("adopted_from"):
        raise AdoptError(f"{out} is a store made by `flowprep extract`; adopt into another --out")
    if old["adopted_from"] != str(src):
        raise AdoptError(f"{out} was adopted from {old['adopted_from']}, not {src}; use another --out")
    if old.get("bound") != bound:
        raise AdoptError(f"{out} was adopted with --bound {old.get('bound')}, asked {bound}; use the same bound, or "
                         "another --out")
    return old


def _probe_links(out: Path, found: list[Found]) -> None:
    """Stop before anything is written when hard links from SRC into --out are impossible."""
    first = next((s.paths()[0] for f in found if not f.problem for s in f.frames.values()), None)
    if first is None:
        return
    probe = temp_name(out / "link-probe")
    try:
        os.link(first, probe)
    except OSError as e:
        why = ("SRC and --out are on different file systems" if e.errno == errnos.EXDEV
               else f"the file system does not allow it ({e.strerror})")
        raise AdoptError(f"cannot hard-link frames from {first.parent} into {out}: {why}. Use --copy to copy them "
                         "(as much space again), or an --out on the file system of SRC") from None
    finally:
        probe.unlink(missing_ok=True)


def run_adopt(src: str | Path, out: str | Path | None = None, *, layout: str = "auto",
              flow_root: str | Path | None = None, rgb_root: str | Path | None = None,
              class_regex: str | None = None, bound: float = DEFAULT_BOUND, mode: str = "link",
              splits: str | Path | None = None, workers: int = 4, progress: bool = True,
              command: str | None = None) -> AdoptSummary:
    """Make a store of the frame folders under `src` (module docstring); returns the summary.

    out: the store (default: `src` itself, in place: its names must be the store's). flow_root /
    rgb_root: the uv layout's folders, relative to `src`. class_regex: the class of a flat video
    name (its named group "class", else group 1), e.g. r"v_([A-Za-z]+)_g\\d+" for UCF-101 names.
    mode: "link" (default), "copy" or "move" when `out` is not `src`. Raises AdoptError for
    problems with the job as a whole, before anything is written; odd videos only fail their own record.
    """
    t0 = time.perf_counter()
    src = Path(src).absolute()
    if not src.is_dir():
        raise AdoptError(f"SRC {src} is not a folder")
    out = src if out is None else Path(out).absolute()
    if layout not in LAYOUTS:
        raise AdoptError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if mode not in MODES:
        raise AdoptError(f"mode must be one of {MODES}, got {mode!r}")
    regex = None
    if class_regex:
        try:
            regex = re.compile(class_regex)
        except re.error as e:
            raise AdoptError(f"--class-regex {class_regex!r} is not a regular expression: {e}") from None
    flows_at, rgb_at = _resolve(src, flow_root) or src, _resolve(src, rgb_root)
    if layout == "auto":
        layout = "uv" if (flows_at / "u").is_dir() and (flows_at / "v").is_dir() else "rawframes"
    in_place = out == src
    if out != src and out in src.parents:
        raise AdoptError(f"--out {out} holds SRC {src}; choose a folder beside or inside it")
    if layout == "uv":
        if not ((flows_at / "u").is_dir() and (flows_at / "v").is_dir()):
            raise AdoptError(f"--layout uv: {flows_at} has no u/ and v/ folders; give --flow-root (relative to SRC)")
        if rgb_at is not None and not rgb_at.is_dir():
            raise AdoptError(f"--rgb-root {rgb_at} is not a folder")
        if in_place:
            raise AdoptError("the u/ v/ layout cannot be a store in place: give --out DIR (hard links, no copies)")
        found = scan_uv(flows_at, rgb_at, regex)
    else:
        if flow_root is not None or rgb_root is not None:
            raise AdoptError("--flow-root and --rgb-root are for the u/ v/ layout (--layout uv); rawframes folders "
                             "hold their RGB and flow frames together")
        found = scan_rawframes(src, None if in_place else out, regex)
    if not found:
        raise AdoptError(f"no frame folders under {src} (looked for <class>/<video>/ folders of img_N.jpg, "
                         "flow_x_N.jpg / x_N.jpg and flow_y_N.jpg / y_N.jpg, or u/<video>/ and v/<video>/ folders)")
    job_mode = "in place" if in_place else mode
    if in_place and mode != "link":
        raise AdoptError(f"--{mode} needs --out: in place nothing is copied or moved")
    if in_place and not any(fits_in_place(f) for f in found if not f.problem):
        example = next((f for f in found if not f.problem), found[0])
        naming = ", ".join(s.naming() for s in example.frames.values()) or example.problem
        raise AdoptError(f"the frames in {src} are not named as in a store ({example.video_id}: {naming}), so the "
                         "store cannot be made in place: give --out DIR to build it there from hard links "
                         "(no copies), or --copy to copy them")
    seen: dict[str, str] = {}
    for f in found:  # two folders mapping to one id (--class-regex): both odd
        if f.video_id in seen and not f.problem:
            f.problem = f"{f.folder} and {seen[f.video_id]} would both be video {f.video_id}"
        seen.setdefault(f.video_id, str(f.folder))

    summary = AdoptSummary(out=out, mode=job_mode, layout=layout, total=len(found))
    out.mkdir(parents=True, exist_ok=True)
    lock = StoreLock(out, command or f"run_adopt({src} -> {out}) in {shlex.join(sys.argv)}")
    try:
        lock.acquire()
    except StoreLocked as e:
        raise AdoptError(str(e)) from None
    try:
        return _run_locked(summary, lock, src, out, found, job_mode, layout, bound, flows_at, rgb_at, class_regex,
                           splits, workers, progress, t0)
    finally:
        lock.release()


def _run_locked(summary: AdoptSummary, lock: StoreLock, src: Path, out: Path, found: list[Found], mode: str,
                layout: str, bound: float, flows_at: Path, rgb_at: Path | None, class_regex: str | None,
                splits, workers: int, progress: bool, t0: float) -> AdoptSummary:
    if lock.note:
        summary.notes.append(lock.note)
    old = _check_store(out, src, float(bound))
    labels = None
    if splits is not None:
        try:
            labels = read_splits(splits)
        except SplitsError as e:
            raise AdoptError(str(e)) from None
    # In place the store is the user's folder: only the store's own top-level leftovers are ours to clear.
    remove_temps(out, recursive=mode != "in place")
    if mode in ("link", "move"):
        _probe_links(out, found)
    info = {"version": STORE_VERSION, "format": "jpeg", "adopted_from": str(src), "layout": layout,
            "bound": float(bound), "direction": "forward", "flow_codec": "jpeg", "algo": None, "preset": None,
            "params": None, "size": None, "short_side": None, "step": None, "jpeg_quality": None, "max_frames": None,
            "implementation": "adopted: flow computed elsewhere, bound as given to flowprep adopt",
            **({"flow_root": str(flows_at), "rgb_root": str(rgb_at) if rgb_at else None} if layout == "uv" else {}),
            **({"class_regex": class_regex} if class_regex else {})}
    store_info = {**{k: v for k, v in old.items() if k in LISTING_KEYS},
                  **info, "rgb": old.get("rgb", True)}
    write_store_info(out, store_info)
    video_info = {k: info[k] for k in ("adopted_from", "bound", "direction", "algo", "preset", "params",
                                       "implementation")}
    job = Job(src, out, mode, video_info)

    store = Store(out)
    manifest = read_manifest(out)
    todo = []
    for f in found:
        if not f.problem and id_problem(f.video_id) is None and store.check(f.video_id) is None:
            summary.skipped.append(f.video_id)
            with store.open(f.video_id) as v:
                if mode == "move":
                    _finish_move(v.meta, v.path)
                if manifest.get(f.video_id, {}).get("status") not in DONE:
                    append_manifest(out, {"id": f.video_id, "label": video_class(f.video_id), "source": str(f.folder),
                                          "status": "partial" if v.meta.get("partial") else "ok",
                                          "frames": v.num_frames, "flows": v.num_flows, "bflows": 0,
                                          "size": v.meta.get("size"), "warning": v.meta.get("warning"),
                                          "error": None, "adopted_from": str(src), "layout": layout,
                                          "naming": v.meta.get("naming")})
        else:
            todo.append(f)
    if mode == "in place":
        summary.notes.append("in place: the frames stay where they are; store.json, meta.json per video, the "
                             "manifest and the list files were added")
    with Progress(len(todo), "adopting", unit="videos", show=progress) as bar:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # file reads and CRC32s release the GIL
            for rec in pool.map(lambda f: adopt_video(job, f), todo):
                if summary.stopped:
                    break
                append_manifest(out, rec)
                vid = rec["id"]
                if rec["status"] in DONE:
                    summary.adopted.append(vid)
                    summary.frames += rec["frames"]
                    summary.flows += rec["flows"]
                    if rec["warning"]:
                        summary.partial[vid] = rec["warning"]
                else:
                    summary.odd[vid] = rec["error"]
                    if rec.get("errno"):  # a full disk: every further video would fail the same way
                        summary.stopped = rec["error"]
                        pool.shutdown(wait=False, cancel_futures=True)
                bar.update(1, failed=int(rec["status"] not in DONE))
    folder_of = {f.video_id: str(f.folder) for f in reversed(found)}  # the first folder of an id
    add_expected(out, [(vid, folder_of[vid]) for vid in summary.adopted + summary.skipped])
    records = read_manifest(out).values()
    labels = labels or sorted_labels(r["id"] for r in records if r.get("status") in DONE)
    write_list_file(out, records, labels.index)
    rgb = any(r.get("status") in DONE and _has_rgb(store, r["id"]) for r in records)
    summary.notes += write_lists(out, records, labels, rgb=rgb)
    listing = {"labels_from": labels.source, "classes": labels.classes, "mmaction2": MMACTION2}
    if labels.folder:
        listing["splits"] = labels.folder
    write_store_info(out, {**info, "rgb": rgb, **listing})
    summary.seconds = time.perf_counter() - t0
    if progress:
        click.echo(summary.format(), err=True)
    return summary


def _has_rgb(store: Store, vid: str) -> bool:
    try:
        with store.open(vid) as v:
            return v.has_rgb
    except (StoreError, OSError, KeyError, ValueError):
        return False
