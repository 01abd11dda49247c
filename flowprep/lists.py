"""List files for MMAction2-style loaders: labels from the official split files, per modality and split.

MMAction2's rawframe datasets read `<frame_dir> <total_frames> <label>` lines and open, for index
i in start_index .. start_index + total_frames - 1, `filename_tmpl.format(i)` (RGB) or
`filename_tmpl.format('x' | 'y', i)` (flow). A flow list must therefore count flows, n - 1 for
n frames: the RGB count makes the loader ask for a flow that does not exist. So a store gets, at
its top level,

    OUT/videos.txt                              every video and its frame count (the original list)
    OUT/rgb.txt, OUT/flow.txt                   every video, frame count and flow count
    OUT/<set>_{rgb,flow}_split<N>_{train,test}.txt    with --splits, per official split, in the
                                                order of the split files (as MMAction2's own tool)

Only files: a JPEG store is an MMAction2 rawframes root as it stands, and MMAction2's
`tools/data/build_file_list.py --level 2` takes every entry two levels down (OUT/*/*) for a video
folder, so nothing but video folders may sit in OUT's folders (older stores kept these lists in
OUT/lists/, which that tool took for a class: it is removed when the lists are next written).
store.json records the list files (`lists`, so those that no longer apply are removed), the
labels (`labels_from`, `classes`: index = label) and, for JPEG stores, the `mmaction2` settings
(core.layout.MMACTION2: filename_tmpl and start_index per modality) that open exactly these files.

Labels: with --splits, from the dataset's own class index: UCF-101's classInd.txt (label =
index - 1; its order is not Python's case-sensitive sort: Hammering < HammerThrow there), or for
HMDB-51 (no index file) the class names sorted; without --splits, the store's class names sorted.
The split files are parsed by core/splits.py for both the lists and the trainer, so they agree on
every label.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from core.atomic import write_atomic
from core.ids import video_class
from core.layout import DONE, LIST_FILE, LISTS
from core.splits import Labels, sorted_labels


def _line(rec: dict, count: int, index: dict[str, int]) -> str:
    """`<video_dir> <count> <label index>`: the line of every list file."""
    return f"{rec['id']} {count} {index[video_class(rec['id'])]}\n"


def write_lists(root: str | Path, records: Iterable[dict], labels: Labels, rgb: bool = True,
                previous: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Write the MMAction2 lists at the store's top level (no RGB lists for a flow-only store,
    `rgb` False); the `previous` ones (store.json's `lists`) that no longer apply are removed.
    Returns (the list files written, notes: split videos missing from the store, classes without a label)."""
    root = Path(root)
    done = {r["id"]: r for r in sorted(records, key=lambda r: r["id"]) if r.get("status") in DONE}
    notes = []
    unlabelled = sorted({video_class(v) for v in done} - set(labels.index))
    if unlabelled:
        notes.append(f"classes not in {labels.source}, left out of the lists: {', '.join(unlabelled[:10])}"
                     + (" ..." if len(unlabelled) > 10 else ""))
    listed = [r for v, r in done.items() if video_class(v) in labels.index]
    kinds = (("rgb", "frames"), ("flow", "flows")) if rgb else (("flow", "flows"),)
    written = []
    for kind, key in kinds:
        written.append(f"{kind}.txt")
        write_atomic(root / f"{kind}.txt", "".join(_line(r, r[key], labels.index) for r in listed))
    for n, parts in sorted(labels.splits.items()):
        for part, ids in parts.items():
            present = [done[v] for v in ids if v in done and video_class(v) in labels.index]
            if len(present) < len(ids):
                notes.append(f"split {n} {part}: {len(ids) - len(present)} of {len(ids)} videos are not in the "
                             "store (left out of its lists)")
            for kind, key in kinds:
                name = f"{labels.dataset}_{kind}_split{n}_{part}.txt"
                written.append(name)
                write_atomic(root / name, "".join(_line(r, r[key], labels.index) for r in present))
    for old in set(previous) - set(written):  # lists of an earlier --splits that no longer apply
        if "/" not in old and old.endswith(".txt") and old != LIST_FILE:
            (root / old).unlink(missing_ok=True)
    _remove_old_lists_folder(root)
    return written, notes


def _remove_old_lists_folder(root: Path) -> None:
    """The OUT/lists/ of stores written before the lists moved to the top: removed when it holds
    list files only (a folder of that name holding anything else is not ours)."""
    folder = root / LISTS
    if folder.is_dir() and not folder.is_symlink() and all(p.is_file() and p.suffix == ".txt"
                                                           for p in folder.iterdir()):
        shutil.rmtree(folder)


def write_list_file(root: str | Path, records: Iterable[dict], labels: dict[str, int] | None = None) -> Path:
    """OUT/videos.txt: `<video_dir> <total_frames> <label index>` of every video in the store.

    `labels`: class name -> index (from a split folder's class index); default: classes sorted
    by name. Classes without a label (not in the index) are left out.
    """
    done = sorted((r for r in records if r.get("status") in DONE), key=lambda r: r["id"])
    if labels is None:
        labels = sorted_labels(r["id"] for r in done).index
    path = Path(root) / LIST_FILE
    write_atomic(path, "".join(_line(r, r["frames"], labels) for r in done if video_class(r["id"]) in labels))
    return path
