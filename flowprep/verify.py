"""`flowprep verify`: prove a store is whole by decoding every frame of every video.

`Store.check` (used to resume) only compares counts; this also decodes each JPEG and checks its
size, and cross-checks the manifest and the list file, so a deleted, truncated or corrupted frame
anywhere is found before training trips over it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flowprep.store import LIST_FILE, Store, StoreError, read_manifest


@dataclass
class VerifyReport:
    root: Path
    ok: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # video id -> what is wrong in the store
    failed: dict[str, str] = field(default_factory=dict)  # video id -> why extraction failed (manifest)
    frames: int = 0
    flows: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.problems or self.failed else 0

    def format(self) -> str:
        lines = [f"{self.root}: {len(self.ok)} videos complete ({self.frames} frames, {self.flows} flows decoded), "
                 f"{len(self.problems)} with problems, {len(self.failed)} failed at extraction"]
        lines += [f"  PROBLEM {vid}: {why}" for vid, why in sorted(self.problems.items())]
        lines += [f"  FAILED  {vid}: {why} (not in the store; fix the video or drop it, then re-run extract)"
                  for vid, why in sorted(self.failed.items())]
        return "\n".join(lines)


def verify_video(store: Store, video_id: str) -> tuple[str | None, int, int]:
    """(problem or None, frames decoded, flows decoded) for one stored video."""
    reason = store.check(video_id)
    if reason:
        return reason, 0, 0
    where = "metadata"
    try:
        with store.open(video_id) as v:
            w, h = v.meta["size"]
            frames = v.num_frames if v.has_rgb else 0
            for i in range(frames):
                where = f"img {i + 1}"
                shape = v.rgb(i).shape
                if shape != (h, w, 3):
                    return f"{where} has shape {shape}, expected {(h, w, 3)}", 0, 0
            for i in range(v.num_flows):
                where = f"flow {i + 1}"
                shape = v.flow(i).shape
                if shape != (h, w, 2):
                    return f"{where} has shape {shape}, expected {(h, w, 2)}", 0, 0
            flows = v.num_flows
    except (StoreError, OSError, KeyError, ValueError) as e:
        return f"{where}: {e}", 0, 0
    return None, frames, flows


def verify_store(root: str | Path, workers: int = 4) -> VerifyReport:
    """Check every video the store or its manifest knows about; threads overlap file reads and JPEG decodes."""
    store = Store(root)
    report = VerifyReport(root=Path(root))
    manifest = read_manifest(root)
    ids = set(store.video_ids())
    for vid, rec in manifest.items():
        if rec.get("status") == "ok":
            ids.add(vid)  # listed as done: must be there
        elif vid not in ids:
            report.failed[vid] = rec.get("error") or "failed"
    list_path = Path(root) / LIST_FILE
    if list_path.is_file():
        ids |= {line.split()[0] for line in list_path.read_text().splitlines() if line.strip()}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda vid: (vid, *verify_video(store, vid)), sorted(ids))
        for vid, problem, frames, flows in results:
            if problem:
                report.problems[vid] = problem
            else:
                report.ok.append(vid)
                report.frames += frames
                report.flows += flows
    return report
