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
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from core.atomic import remove_temps, temp_name, write_json
from core.ids import id_problem, video_class
from core.layout import DONE, META, STORE_INFO, STORE_VERSION, frame_name
from core.splits import SplitsError, read_splits
from flowprep.adopt_scan import (LAYOUTS, NO_CLASS, Classes, Found, Odd, find_rgb_beside, find_uv, fits_in_place,
                                 jpeg_size, scan_rawframes, scan_uv, whole_jpeg)
from flowprep.distribute import Cluster
from flowprep.job import JobError, StoreJob, Summary, record
from flowprep.quant import DEFAULT_BOUND
from flowprep.store import Store
from flowprep.store_base import StoreError, crc_hex
from flowprep.store_files import STOP_ERRNOS, os_error_sentence
from flowprep import store_jpeg
from flowprep.store_jpeg import commit_folder

MODES = ("link", "copy", "move")


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
            if wh is None or not whole_jpeg(data):
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


@dataclass(frozen=True)
class Adoption:
    """What every video of an adopt job shares."""

    src: Path
    out: Path
    mode: str  # "in place", "link", "copy", "move"
    store_info: dict  # store.json's parameters

    @property
    def info(self) -> dict:
        """What each video's meta repeats of them."""
        return {k: self.store_info[k] for k in ("adopted_from", "bound", "direction", "algo", "preset", "params",
                                                "implementation")}


def _place(job: Adoption, source: Path, dest: Path) -> None:
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


def adopt_video(job: Adoption, found: Found) -> dict:
    """Adopt one video; returns its manifest record (status ok / partial / failed with the reason)."""
    t0 = time.perf_counter()
    extra = {"adopted_from": str(job.src), "layout": found.layout, "declared_frames": None, "decoded_frames": None}
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
        final = store_jpeg.path(job.out, found.video_id)
        if job.mode == "in place":
            meta["extra_files"] = left
            write_json(final / META, meta)
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
        return record(found.video_id, found.folder, status="partial" if warning else "ok", frames=frames,
                      flows=flows, size=size, warning=warning, seconds=time.perf_counter() - t0,
                      naming=meta["naming"], rgb=rgb, **extra)
    except Odd as e:
        return record(found.video_id, found.folder, error=str(e), seconds=time.perf_counter() - t0, **extra)
    except OSError as e:
        return record(found.video_id, found.folder, error=os_error_sentence(e, job.out),
                      errno=errnos.errorcode[e.errno] if e.errno in STOP_ERRNOS else None,
                      seconds=time.perf_counter() - t0, **extra)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the job

class AdoptSummary(Summary):
    failed_label = "ODD"
    mode = "link"
    layout = ""

    @property
    def adopted(self) -> list[str]:
        return self.done

    @property
    def odd(self) -> dict[str, str]:
        return self.failed

    def headline(self) -> str:
        how = {"in place": "in place", "link": "hard links", "copy": "copies", "move": "moved"}[self.mode]
        return (f"{self.total} videos: {len(self.done)} adopted, {len(self.failed)} odd, {len(self.skipped)} already "
                f"adopted (skipped); {self.frames} RGB frames and {self.flows} flows ({self.layout} layout, {how}) in "
                f"{self.seconds:.1f} s")

    def stop_sentence(self) -> str:
        return f"stopped early: {self.stopped}"


class AdoptJob(StoreJob):
    summary_class = AdoptSummary
    verb = "adopt"

    def __init__(self, out: Path, found: list[Found], adoption: Adoption, layout: str, bound: float, **kw):
        super().__init__(out, [(f.video_id, str(f.folder)) for f in found], **kw)
        self.by_folder = {(f.video_id, str(f.folder)): f for f in found}
        self.found, self.adoption, self.bound = found, adoption, bound
        self.summary.mode, self.summary.layout = adoption.mode, layout

    def store_info(self, old: dict) -> dict:
        """The adopted store's settings; JobError for a store made otherwise."""
        out, src = self.out, self.adoption.src
        if old.get("damaged"):
            raise JobError(f"{out / STORE_INFO} is damaged; remove it (or use another --out) to adopt again")
        if old and not old.get("adopted_from"):
            raise JobError(f"{out} is a store made by `flowprep extract`; adopt into another --out")
        if old and old["adopted_from"] != str(src):
            raise JobError(f"{out} was adopted from {old['adopted_from']}, not {src}; use another --out")
        if old and old.get("bound") != self.bound:
            raise JobError(f"{out} was adopted with --bound {old.get('bound')}, asked {self.bound}; use the same "
                           "bound, or another --out")
        return {**self.adoption.store_info, "rgb": old.get("rgb", True)}

    def clean(self) -> None:
        # In place the store is the user's folder: only the store's own top-level leftovers are ours to clear.
        remove_temps(self.out, recursive=self.adoption.mode != "in place")

    def prepare(self, store: Store) -> None:
        if self.adoption.mode in ("link", "move"):
            _probe_links(self.out, self.found)
        if self.adoption.mode == "in place":
            self.summary.notes.append("in place: the frames stay where they are; store.json, meta.json per video, "
                                      "the manifest and the list files were added")

    def plan(self, store: Store, video_id: str, source: str) -> tuple | None:
        f = self.by_folder[(video_id, source)]
        seen = None if f.problem or id_problem(video_id) else store.inspect(video_id)
        if seen and seen.problem is None:
            if self.adoption.mode == "move":  # a move killed after the commit: finish it
                _finish_move(seen.meta, store.path(video_id))
            return None
        return adopt_video, (self.adoption, f)

    def record_extra(self, meta: dict) -> dict:
        return {"adopted_from": str(self.adoption.src), "layout": self.summary.layout, "naming": meta.get("naming"),
                "declared_frames": None, "decoded_frames": None}

    def account(self, rec: dict, upgrade: bool) -> None:
        if rec["status"] in DONE:
            self.summary.frames += rec["frames"] if rec.get("rgb", True) else 0  # RGB frames stored
            self.summary.flows += rec["flows"]

    def has_rgb(self, store: Store, records) -> bool:
        return any(r.get("status") in DONE and _has_rgb(store, r["id"]) for r in records)


def _has_rgb(store: Store, vid: str) -> bool:
    try:
        with store.open(vid) as v:
            return v.has_rgb
    except (StoreError, OSError, KeyError, ValueError):
        return False


def _classes(class_regex: str | None, splits: str | Path | None) -> tuple[Classes, list[str]]:
    """How flat video names get their class (adopt_scan.Classes), and a note saying so; JobError
    for a --class-regex that is no regular expression or a --splits folder that cannot be read."""
    regex, by_name = None, {}
    if class_regex:
        try:
            regex = re.compile(class_regex)
        except re.error as e:
            raise JobError(f"--class-regex {class_regex!r} is not a regular expression: {e}") from None
    if splits is not None:
        try:
            labels = read_splits(splits)  # a bad folder stops the job now
        except SplitsError as e:
            raise JobError(str(e)) from None
        by_name = {vid.rsplit("/", 1)[-1]: video_class(vid) for parts in labels.splits.values()
                   for ids in parts.values() for vid in ids if "/" in vid}
    return Classes(regex, by_name), []


def _resolve(src: Path, path: str | Path | None) -> Path | None:
    return None if path is None else (src / path).absolute()


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
        raise JobError(f"cannot hard-link frames from {first.parent} into {out}: {why}. Use --copy to copy them "
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
    mode: "link" (default), "copy" or "move" when `out` is not `src`. Raises JobError for
    problems with the job as a whole, before anything is written; odd videos only fail their own record.
    """
    src = Path(src).absolute()
    if not src.is_dir():
        raise JobError(f"SRC {src} is not a folder")
    out = src if out is None else Path(out).absolute()
    if layout not in LAYOUTS:
        raise JobError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if mode not in MODES:
        raise JobError(f"mode must be one of {MODES}, got {mode!r}")
    classes, notes = _classes(class_regex, splits)
    flows_at, rgb_at = _resolve(src, flow_root) or src, _resolve(src, rgb_root)
    if layout == "auto":
        uv = find_uv(flows_at)
        layout = "uv" if uv else "rawframes"
        if uv and uv != flows_at:
            notes.append(f"u/ and v/ flow folders found in {uv}")
        flows_at = uv or flows_at
        if uv and rgb_root is None and uv != src:
            rgb_at = find_rgb_beside(src, uv)
            if rgb_at is not None:
                notes.append(f"RGB frames from {rgb_at}, beside {uv.name}/ (--rgb-root to choose another folder)")
    in_place = out == src
    if out != src and out in src.parents:
        raise JobError(f"--out {out} holds SRC {src}; choose a folder beside or inside it")
    if layout == "uv":
        if not ((flows_at / "u").is_dir() and (flows_at / "v").is_dir()):
            raise JobError(f"--layout uv: {flows_at} has no u/ and v/ folders; give --flow-root (relative to SRC)")
        if rgb_at is not None and not rgb_at.is_dir():
            raise JobError(f"--rgb-root {rgb_at} is not a folder")
        if in_place:
            raise JobError("the u/ v/ layout cannot be a store in place: give --out DIR (hard links, no copies)")
        found = scan_uv(flows_at, rgb_at, classes)
    else:
        if flow_root is not None or rgb_root is not None:
            raise JobError("--flow-root and --rgb-root are for the u/ v/ layout (--layout uv); rawframes folders "
                             "hold their RGB and flow frames together")
        found = scan_rawframes(src, None if in_place else out, Classes(infer=False) if in_place else classes)
    if not found:
        raise JobError(f"no frame folders under {src} (looked for <class>/<video>/ folders of img_N.jpg, "
                         "flow_x_N.jpg / x_N.jpg and flow_y_N.jpg / y_N.jpg, or u/<video>/ and v/<video>/ folders)")
    notes += [f"{n} flat video folder(s) got their class from {how}" for how, n in classes.inferred.items()]
    classless = [f for f in found if f.problem and NO_CLASS in f.problem]
    if classless and len(classless) == len(found):
        raise JobError(f"none of the {len(found)} video folders has a class: {classless[0].problem}")
    if any(f.frames and "/" not in f.video_id for f in found if not f.problem):
        names = sorted(f.video_id for f in found if "/" not in f.video_id)
        raise JobError(f"in place, every video needs its class folder (<class>/<video>/), but {names[0]} has none; "
                       "give --out DIR to build the store with class folders (hard links, no copies)")
    job_mode = "in place" if in_place else mode
    if in_place and mode != "link":
        raise JobError(f"--{mode} needs --out: in place nothing is copied or moved")
    if in_place and not any(fits_in_place(f) for f in found if not f.problem):
        example = next((f for f in found if not f.problem), found[0])
        naming = ", ".join(s.naming() for s in example.frames.values()) or example.problem
        raise JobError(f"the frames in {src} are not named as in a store ({example.video_id}: {naming}), so the "
                         "store cannot be made in place: give --out DIR to build it there from hard links "
                         "(no copies), or --copy to copy them")
    seen: dict[str, str] = {}
    for f in found:  # two folders mapping to one id (--class-regex): both odd
        if f.video_id in seen and not f.problem:
            f.problem = f"{f.folder} and {seen[f.video_id]} would both be video {f.video_id}"
        seen.setdefault(f.video_id, str(f.folder))

    store_info = {"version": STORE_VERSION, "format": "jpeg", "adopted_from": str(src), "layout": layout,
                  "bound": float(bound), "direction": "forward", "flow_codec": "jpeg", "algo": None, "preset": None,
                  "params": None, "size": None, "short_side": None, "step": None, "jpeg_quality": None,
                  "max_frames": None,
                  "implementation": "adopted: flow computed elsewhere, bound as given to flowprep adopt",
                  **({"flow_root": str(flows_at), "rgb_root": str(rgb_at) if rgb_at else None} if layout == "uv"
                     else {}),
                  **({"class_regex": class_regex} if class_regex else {})}
    job = AdoptJob(out, found, Adoption(src, out, job_mode, store_info), layout, float(bound), backend="threads",
                   workers=max(1, workers), cluster=Cluster(), splits=Path(splits) if splits else None,
                   progress=progress, notes=notes, command=command or f"run_adopt({src} -> {out}) in {shlex.join(sys.argv)}")
    return job.run()
