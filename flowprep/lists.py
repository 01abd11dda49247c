"""List files for MMAction2-style loaders: labels from the official split files, per modality and split.

MMAction2's rawframe datasets read `<frame_dir> <total_frames> <label>` lines and open, for index
i in start_index .. start_index + total_frames - 1, `filename_tmpl.format(i)` (RGB) or
`filename_tmpl.format('x' | 'y', i)` (flow). A flow list must therefore count flows, n - 1 for
n frames: the RGB count makes the loader ask for a flow that does not exist. So a store gets

    OUT/videos.txt                              every video and its frame count (the original list)
    OUT/lists/rgb.txt, OUT/lists/flow.txt       every video, frame count and flow count
    OUT/lists/<set>_{rgb,flow}_split<N>_{train,test}.txt    with --splits, per official split

(OUT/lists/ is flowprep's: list files there that no longer apply are removed), and store.json
records `labels_from`, `classes` (index = label) and, for JPEG stores, the
`mmaction2` settings (filename_tmpl and start_index per modality) that open exactly these files.

Labels: with --splits, from the dataset's own class index: UCF-101's classInd.txt (label =
index - 1; its order is not Python's case-sensitive sort: Hammering < HammerThrow there), or for
HMDB-51 (no index file) the class names sorted, as the trainer (trainer/splits.py) does; without
--splits, the store's class names sorted. The split files are parsed by trainer/splits.py, so
the lists and the trainer agree on every label.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from flowprep.store import DONE, LISTS, video_class, write_atomic

MMACTION2 = {
    "rgb": {"modality": "RGB", "filename_tmpl": "img_{:05}.jpg", "start_index": 1},
    "flow": {"modality": "Flow", "filename_tmpl": "flow_{}_{:05d}.jpg", "start_index": 1},
}


class SplitsError(ValueError):
    """A --splits folder that cannot be read; the message says which and why."""


@dataclass
class Labels:
    """Class index (name -> label), where it came from, and the official splits when known."""

    index: dict[str, int]
    source: str  # "sorted class names" or the class index file
    dataset: str = ""  # "ucf101" / "hmdb51"
    splits: dict[int, dict[str, list[str]]] = field(default_factory=dict)  # split -> part -> video ids
    folder: str = ""

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in sorted(self.index.items(), key=lambda kv: kv[1])]


def sorted_labels(ids: Iterable[str]) -> Labels:
    classes = sorted({video_class(v) for v in ids})
    return Labels({c: i for i, c in enumerate(classes)}, "sorted class names")


def read_splits(folder: str | Path) -> Labels:
    """Labels and splits of a UCF-101 ucfTrainTestlist folder (classInd.txt) or an HMDB-51 split folder."""
    from trainer.splits import SplitError, read_hmdb51, read_ucf101

    folder = Path(folder)
    if not folder.is_dir():
        raise SplitsError(f"--splits {folder}: no such folder")
    try:
        if (folder / "classInd.txt").is_file():
            numbers = sorted(int(m.group(1)) for p in folder.glob("trainlist*.txt")
                             if (m := re.fullmatch(r"trainlist(\d+)\.txt", p.name)))
            labels = Labels({}, str(folder / "classInd.txt"), "ucf101", folder=str(folder))
            names = None
            for n in numbers:
                names, train, test = read_ucf101(folder, n)
                labels.splits[n] = {"train": train.video_ids, "test": test.video_ids}
            if names is None:  # a class index without split lists: labels only
                rows = [line.split() for line in (folder / "classInd.txt").read_text().splitlines() if line.strip()]
                names = [name for _, name in sorted((int(i), name) for i, name in rows)]
            labels.index = {c: i for i, c in enumerate(names)}
            return labels
        numbers = sorted({int(m.group(1)) for p in folder.glob("*_test_split*.txt")
                          if (m := re.fullmatch(r".+_test_split(\d+)\.txt", p.name))})
        if numbers:
            labels = Labels({}, "sorted class names (HMDB-51 split files)", "hmdb51", folder=str(folder))
            for n in numbers:
                names, train, test = read_hmdb51(folder, n)
                labels.splits[n] = {"train": train.video_ids, "test": test.video_ids}
            labels.index = {c: i for i, c in enumerate(names)}
            return labels
    except (SplitError, ValueError, IndexError) as e:
        raise SplitsError(f"--splits {folder}: {e}") from None
    raise SplitsError(f"--splits {folder}: neither a UCF-101 ucfTrainTestlist folder (classInd.txt, "
                      "trainlistNN.txt, testlistNN.txt) nor an HMDB-51 split folder (<class>_test_splitN.txt)")


def _line(rec: dict, count: int, labels: Labels) -> str:
    return f"{rec['id']} {count} {labels.index[video_class(rec['id'])]}\n"


def write_lists(root: str | Path, records: Iterable[dict], labels: Labels, rgb: bool = True) -> list[str]:
    """Write OUT/lists/ (no RGB lists for a flow-only store, `rgb` False); returns notes (split
    videos missing from the store, classes without a label)."""
    root = Path(root)
    done = {r["id"]: r for r in sorted(records, key=lambda r: r["id"]) if r.get("status") in DONE}
    notes = []
    unlabelled = sorted({video_class(v) for v in done} - set(labels.index))
    if unlabelled:
        notes.append(f"classes not in {labels.source}, left out of the lists: {', '.join(unlabelled[:10])}"
                     + (" ..." if len(unlabelled) > 10 else ""))
    listed = [r for v, r in done.items() if video_class(v) in labels.index]
    folder = root / LISTS
    folder.mkdir(exist_ok=True)
    kinds = (("rgb", "frames"), ("flow", "flows")) if rgb else (("flow", "flows"),)
    wanted = set()
    for kind, key in kinds:
        wanted.add(f"{kind}.txt")
        write_atomic(folder / f"{kind}.txt", "".join(_line(r, r[key], labels) for r in listed))
    for n, parts in sorted(labels.splits.items()):
        for part, ids in parts.items():
            present = [done[v] for v in sorted(ids) if v in done and video_class(v) in labels.index]
            if len(present) < len(ids):
                notes.append(f"split {n} {part}: {len(ids) - len(present)} of {len(ids)} videos are not in the "
                             "store (left out of its lists)")
            for kind, key in kinds:
                name = f"{labels.dataset}_{kind}_split{n}_{part}.txt"
                wanted.add(name)
                write_atomic(folder / name, "".join(_line(r, r[key], labels) for r in present))
    for old in folder.glob("*.txt"):  # lists of an earlier --splits that no longer apply
        if old.name not in wanted:
            old.unlink()
    return notes
