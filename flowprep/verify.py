"""`flowprep verify`: prove a store is whole: every expected video there, every frame's bytes as written.

`Store.check` (used to resume and before training) only compares counts. This also reads every
stored frame and compares the CRC32 of its bytes with the one recorded when it was written, so
damage in place (bytes zeroed or flipped inside a JPEG, which still decodes, to the wrong picture)
is found, then decodes it (a raw flow plane: its length) and checks its size (what a checksum cannot vouch for in a store made
before checksums were recorded). It cross-checks the manifest, the list file and OUT/expected.json
(every video any job on the store was asked for), so a half-finished store (a run killed before
some videos, never re-run) does not pass either.

Findings go to OUT/verify.json: the next `flowprep extract` redoes exactly those videos, even
though their counts look right (`extract --repair` runs this same pass itself first). Only damage
the cheap `Store.check` cannot see is recorded: what it sees (a missing frame, a video without
the backward flows a "both" store needs) the next extract finds by itself, and handles best
(a whole forward video there gains its backward flows rather than being redone). Verify
holds the store's lock while it runs: its findings mean nothing while a job is writing.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flowprep.lock import StoreLock
from core.layout import DONE, FINDINGS, FLOW_KINDS, KINDS, LIST_FILE
from flowprep.store import Store
from flowprep.store_base import StoreError, decode_jpeg
from flowprep.store_files import read_expected, read_manifest, write_findings


@dataclass
class VerifyReport:
    root: Path
    ok: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # video id -> what is wrong in the store
    damaged: dict[str, str] = field(default_factory=dict)  # the problems the cheap Store.check cannot see
    failed: dict[str, str] = field(default_factory=dict)  # video id -> why extraction failed (manifest)
    partial: dict[str, str] = field(default_factory=dict)  # video id -> what its cut source lost (not a problem)
    unchecked: list[str] = field(default_factory=list)  # videos stored without checksums: decoded only
    notes: list[str] = field(default_factory=list)
    frames: int = 0
    flows: int = 0
    adopted: bool = False  # made by `flowprep adopt`: redone by adopting again, not by extract

    @property
    def exit_code(self) -> int:
        return 1 if self.problems or self.failed else 0

    def format(self) -> str:
        lines = [f"{self.root}: {len(self.ok)} videos complete ({self.frames} frames, {self.flows} flows checked), "
                 f"{len(self.problems)} with problems, {len(self.failed)} failed at extraction"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.unchecked:
            lines.append(f"  note: {len(self.unchecked)} videos have no checksums (extracted by an older flowprep), "
                         "so were only decoded: damage that still decodes goes unseen; `flowprep extract "
                         "--overwrite` adds them")
        again = "flowprep adopt" if self.adopted else "extract"
        lines += [f"  PARTIAL {vid}: {why} (kept; to redo it from a whole source, delete it from the store and "
                  f"run {again} again)" for vid, why in sorted(self.partial.items())]
        lines += [f"  PROBLEM {vid}: {why}" for vid, why in sorted(self.problems.items())]
        lines += [f"  FAILED  {vid}: {why} (not in the store; fix the {'frames' if self.adopted else 'video'} or "
                  f"drop it, then re-run {again})" for vid, why in sorted(self.failed.items())]
        if self.problems and self.adopted:
            lines.append("Run the same `flowprep adopt` again: it redoes the videos with problems (recorded in "
                         "verify.json). With hard links the store's frames are the source's files: damage inside a "
                         "frame is in the source too, and needs the frames extracted again.")
        elif self.problems:
            lines.append("Run `flowprep extract` with the same options again: it redoes exactly the videos with "
                         "problems (recorded in verify.json).")
        return "\n".join(lines)


LABELS = {"img": "img", "flow_x": "flow", "flow_y": "flow", "bflow_x": "bflow", "bflow_y": "bflow"}


def verify_video(store: Store, video_id: str) -> tuple[str | None, int, int, bool]:
    """(problem or None, frames checked, flows checked, had checksums) for one stored video.

    Frame by frame (img 1.., then flow 1.. x before y, then backward flows), so the problem
    named is the first damaged frame.
    """
    reason = store.check(video_id)
    if reason:
        return reason, 0, 0, False
    try:
        with store.open(video_id) as v:
            w, h = v.meta["size"]
            crc = v.checksums()
            for kind in KINDS:
                if crc is not None and v.count(kind) and len(crc.get(kind, ())) != v.count(kind):
                    return (f"checksums recorded for {len(crc.get(kind, ()))} {kind} frames but {v.count(kind)} "
                            "stored"), 0, 0, True

            name = v.frame_label
            for i in range(v.count("img")):
                problem = _check_frame(v, "img", i, (h, w, 3), crc, name)
                if problem:
                    return problem, 0, 0, crc is not None
            for backward in (False, True):
                for i in range(v.num_bflows if backward else v.num_flows):
                    for kind in FLOW_KINDS[backward]:
                        problem = _check_frame(v, kind, i, (h, w), crc, name)
                        if problem:
                            return problem, 0, 0, crc is not None
            return None, v.count("img"), v.num_flows + v.num_bflows, crc is not None
    except (StoreError, OSError, KeyError, ValueError) as e:
        return f"metadata: {e}", 0, 0, False


def _check_frame(v, kind: str, i: int, shape: tuple, crc: dict | None, name) -> str | None:
    where = f"{LABELS[kind]} {i + 1} ({name(kind, i)})"
    try:
        data = v.frame_bytes(kind, i)
    except (StoreError, OSError, KeyError, IndexError) as e:
        return f"{where}: {e}"
    if crc is not None:
        got = zlib.crc32(data)
        if got != crc[kind][i]:
            return (f"{where}: checksum mismatch: its bytes give CRC32 {got:08x}, {crc[kind][i]:08x} was recorded "
                    "when it was written (changed on disk since)")
    if kind != "img" and v.flow_codec == "raw":  # an uncompressed plane: its length is its shape
        if len(data) != shape[0] * shape[1]:
            return f"{where}: {len(data)} bytes, expected a {shape[1]}x{shape[0]} plane of {shape[0] * shape[1]}"
        return None
    try:
        img = decode_jpeg(data, gray=kind != "img", what=name(kind, i))
    except StoreError as e:
        return f"{where}: {e}"
    if img.shape != shape:
        return f"{where} has shape {img.shape}, expected {shape}"
    return None


def verify_store(root: str | Path, workers: int = 4, record: bool = True, lock: bool = True) -> VerifyReport:
    """Check every video the store, its manifest, its list file or its expected list knows about.

    record: write the findings to OUT/verify.json for the next extract to redo.
    lock: hold the store's lock meanwhile (raises flowprep.lock.StoreLocked while a job runs);
    `extract --repair`, which holds it already, passes False. Threads overlap reads and decodes.
    """
    store = Store(root, findings=False)  # look afresh, not at the last verify's findings
    report = VerifyReport(root=Path(root), adopted=bool(store.info.get("adopted_from")))
    held = None
    if lock:
        held = StoreLock(root, f"flowprep verify {root}")
        try:
            held.acquire()
        except OSError as e:  # a read-only store: nothing can write it either
            held = None
            report.notes.append(f"not locked ({e.strerror or e}); findings not recorded")
            record = False
        else:
            if held.note:
                report.notes.append(held.note)
    try:
        _verify(store, report, workers)
        if record:
            try:
                write_findings(root, report.damaged)
            except OSError as e:
                report.notes.append(f"findings not recorded in {Path(root) / FINDINGS}: {e.strerror or e}")
    finally:
        if held is not None:
            held.release()
    return report


def _verify(store: Store, report: VerifyReport, workers: int) -> None:
    root = store.root
    manifest = read_manifest(root)
    ids = set(store.video_ids())
    for vid, rec in manifest.items():
        if rec.get("status") in DONE:
            ids.add(vid)  # listed as done: must be there
        elif vid not in ids:
            report.failed[vid] = rec.get("error") or "failed"
    list_path = Path(root) / LIST_FILE
    if list_path.is_file():
        ids |= {line.split()[0] for line in list_path.read_text().splitlines() if line.strip()}
    for vid in read_expected(root):
        if vid not in ids and vid not in report.failed:
            report.problems[vid] = ("not extracted: a job on this store was asked for it (expected.json) and never "
                                    "finished it (killed, or stopped early)")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda vid: (vid, *verify_video(store, vid)), sorted(ids))
        for vid, problem, frames, flows, checked in results:
            if problem:
                report.problems[vid] = problem
                if store.check(vid) is None:  # beyond counts: only the full pass finds it
                    report.damaged[vid] = problem
                continue
            report.ok.append(vid)
            report.frames += frames
            report.flows += flows
            if not checked:
                report.unchecked.append(vid)
            rec = manifest.get(vid, {})
            if rec.get("status") == "partial":
                report.partial[vid] = rec.get("warning") or "its source was cut short"
