"""Which videos a stream trains on, from which datasets, checked against the store before any
training starts (the split files themselves are parsed by core/splits.py).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from core.splits import Part, Split, split_from_config
from flowprep.store import Store
from flowprep.store_base import StoreError

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One dataset a stream trains on: its data section, split, and first class in the stream's
    combined class list (multi-task streams stack every dataset's classes, one head each)."""

    name: str  # "" for the pipeline's [data]
    data: dict
    split: Split
    offset: int = 0

    @property
    def classes(self) -> list[str]:
        return list(self.split.class_names)


def tasks_for(cfg: dict, datasets: list[str] | tuple[str, ...] = ()) -> list[Task]:
    """[data] alone, or the listed [datasets.NAME] of a multi-task stream."""
    if not datasets:
        return [Task("", cfg.get("data", {}), split_from_config(cfg))]
    tasks, offset = [], 0
    for name in datasets:
        data = cfg["datasets"][name]
        split = split_from_config({"data": data})
        tasks.append(Task(name, data, split, offset))
        offset += len(split.class_names)
    return tasks


def class_names(tasks: list[Task]) -> list[str]:
    if len(tasks) == 1:
        return tasks[0].classes
    return [f"{t.name}/{c}" for t in tasks for c in t.classes]


MODALITY_HELP = {"rgb": "RGB frames (extracted with --no-rgb: flow only; re-extract with --rgb)",
                 "bflow": "backward flow (extract with --direction both)", "flow": "flow"}


def check_videos(store: Store, part: Part, skip_missing: bool = False, what: str = "",
                 reads: tuple[str, ...] = ("flow",)) -> tuple[Part, list[tuple[int, int]]]:
    """Check every video of `part` in the store before any training starts: complete, and holding
    the modalities the stream input `reads` (RGB frames, backward flow) that a store may lack.

    Returns the part (minus bad videos when `skip_missing`) and (frames, flows) per video;
    raises StoreError naming the missing or incomplete videos otherwise.
    """
    def probe(vid: str):
        reason = store.check(vid)
        if reason is not None:
            return reason, None
        try:
            with store.open(vid) as v:
                have = {"rgb": v.has_rgb, "flow": v.num_flows > 0, "bflow": v.num_bflows > 0}
                lacking = [m for m in reads if not have[m]]
                if lacking:
                    return "no " + " and no ".join(MODALITY_HELP[m] for m in lacking), None
                return None, (v.num_frames, v.num_flows)
        except (StoreError, OSError) as e:
            return str(e), None
    with ThreadPoolExecutor(16) as pool:  # stat/scandir-bound: threads overlap the file system waits
        results = list(pool.map(probe, part.video_ids))
    bad = [(vid, r) for vid, (r, _) in zip(part.video_ids, results) if r is not None]
    if bad and not skip_missing:
        shown = "\n".join(f"  {vid}: {reason}" for vid, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise StoreError(f"{len(bad)} of {len(part)} {what}videos listed in the split are missing or incomplete "
                         f"in the store {store.root}:\n{shown}{more}\nRun `flowprep extract` to (re)extract them, "
                         f"or pass --skip-missing (data.skip_missing=true) to train without them.")
    if bad:
        log.warning(f"warning: skipping {len(bad)} {what}videos missing or incomplete in {store.root}: "
                    + ", ".join(v for v, _ in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    keep = Part()
    counts = []
    for vid, lab, (reason, n) in zip(part.video_ids, part.labels, results):
        if reason is None:
            keep.video_ids.append(vid)
            keep.labels.append(lab)
            counts.append(n)
    return keep, counts
