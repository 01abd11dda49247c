"""Classes and splits: which videos train, validate and test, with which labels.

Three formats of split folder, chosen by `data.split_format`:

- ``ucf101``: the official ucfTrainTestlist folder. classInd.txt (``1 ApplyEyeMakeup``),
  trainlistNN.txt (``ApplyEyeMakeup/v_..._g08_c01.avi 1``), testlistNN.txt (path only).
- ``hmdb51``: the official testTrainMulti_7030_splits folder. ``<class>_test_splitN.txt``
  with ``<video>.avi K`` lines, K = 1 train, 2 test, 0 unused.
- ``list``: a folder with train.txt and test.txt, ``<path> <label>`` per line; the label is a
  class index or a class name.

Video ids are paths relative to the videos root without extension (the store's ids, core/ids.py).
The validation part is held out of the training part: whole UCF groups (``_gGG_``, clips cut
from one long video) when the names carry them, so near-duplicate clips never straddle
train and val; single videos otherwise. The choice is deterministic.

Labels (`Labels`, `read_splits`): the class index flowprep's list files and the trainer share.
With a split folder, the dataset's own: UCF-101's classInd.txt (label = index - 1; its order is
not Python's case-sensitive sort: Hammering < HammerThrow there), or for HMDB-51 (no index
file) the class names sorted; without one, the store's class names sorted.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from core.ids import video_class

SPLIT_FORMATS = ("ucf101", "hmdb51", "list")
PARTS = ("train", "val", "test")
GROUP = re.compile(r"_g(\d+)_c\d+$")
log = logging.getLogger(__name__)


class SplitError(ValueError):
    """A split folder or file that cannot be read; the message says which and why."""


@dataclass
class Part:
    video_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.video_ids)


@dataclass
class Split:
    class_names: list[str]
    train: Part
    val: Part
    test: Part

    def part(self, name: str) -> Part:
        if name not in PARTS:
            raise SplitError(f"split part must be one of {PARTS}, got {name!r}")
        return getattr(self, name)


def strip_ext(path: str) -> str:
    p = path.strip().replace("\\", "/")
    stem, dot, ext = p.rpartition(".")
    return stem if dot and "/" not in ext else p


def _lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip()]


def read_ucf101(folder: Path, split: int) -> tuple[list[str], Part, Part]:
    class_ind = folder / "classInd.txt"
    if not class_ind.is_file():
        raise SplitError(f"{folder} has no classInd.txt; is it a UCF-101 ucfTrainTestlist folder? "
                         f"(set data.split_format to hmdb51 or list for other layouts)")
    rows = _lines(class_ind)
    try:
        index = {name: int(i) - 1 for i, name in rows}
    except ValueError as e:
        raise SplitError(f"{class_ind}: expected '<index> <class>' lines ({e})") from e
    names = [n for n, _ in sorted(index.items(), key=lambda kv: kv[1])]
    if sorted(index.values()) != list(range(len(names))):
        raise SplitError(f"{class_ind}: class indices must run 1..{len(names)}")
    parts = []
    for kind in ("train", "test"):
        path = folder / f"{kind}list{split:02d}.txt"
        part = Part()
        for n, row in enumerate(_lines(path), 1):
            vid = strip_ext(row[0])
            cls = video_class(vid)
            if cls not in index:
                raise SplitError(f"{path}:{n}: class {cls!r} of {row[0]} is not in {class_ind}")
            part.video_ids.append(vid)
            part.labels.append(index[cls])
        parts.append(part)
    return names, parts[0], parts[1]


def read_hmdb51(folder: Path, split: int) -> tuple[list[str], Part, Part]:
    pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
    files = sorted(p for p in folder.glob(f"*_test_split{split}.txt") if pattern.match(p.name)) if folder.is_dir() else []
    if not files:
        raise SplitError(f"{folder} has no <class>_test_split{split}.txt files; is it the HMDB-51 "
                         f"testTrainMulti_7030_splits folder, and does split {split} exist?")
    names = [pattern.match(p.name).group(1) for p in files]
    train, test = Part(), Part()
    for label, (cls, path) in enumerate(zip(names, files)):
        for n, row in enumerate(_lines(path), 1):
            if len(row) != 2 or row[1] not in ("0", "1", "2"):
                raise SplitError(f"{path}:{n}: expected '<video> 0|1|2', got {' '.join(row)!r}")
            if row[1] == "0":
                continue
            part = train if row[1] == "1" else test
            part.video_ids.append(f"{cls}/{strip_ext(row[0])}")
            part.labels.append(label)
    return names, train, test


def read_list(folder: Path, split: int) -> tuple[list[str], Part, Part]:
    rows = {}
    for kind in ("train", "test"):
        path = folder / f"{kind}.txt"
        rows[kind] = _lines(path)
        for n, row in enumerate(rows[kind], 1):
            if len(row) != 2:
                raise SplitError(f"{path}:{n}: expected '<path> <label>', got {' '.join(row)!r}")
    labels = [r[1] for kind in rows for r in rows[kind]]
    if all(re.fullmatch(r"\d+", x) for x in labels):
        # Integer labels: name each class after its videos' folder when they share one.
        n_classes = max(int(x) for x in labels) + 1
        names = [f"class{k}" for k in range(n_classes)]
        for kind in rows:
            for path, lab in rows[kind]:
                cls = video_class(strip_ext(path))
                if cls and names[int(lab)] == f"class{lab}":
                    names[int(lab)] = cls
        index = {str(k): k for k in range(n_classes)}
    else:
        names = sorted(set(labels))
        index = {n: k for k, n in enumerate(names)}
    parts = []
    for kind in ("train", "test"):
        part = Part([strip_ext(p) for p, _ in rows[kind]], [index[lab] for _, lab in rows[kind]])
        parts.append(part)
    return names, parts[0], parts[1]


def hold_out(train: Part, fraction: float, seed: int = 0) -> tuple[Part, Part]:
    """Split `train` into (train, val), holding out a `fraction` of the groups.

    With UCF-style ids (`_gNN_`) the same group numbers are held out for every class, as the
    official splits do: clips of one group share their source, and synthetic sets share scenes
    across classes by group, so per-class choices would leak near-twins of val videos into train.
    Without groups, a `fraction` of each class's videos goes to val. Every class keeps at least
    one training group, and a part with two or more groups gives at least one to val.
    """
    if not 0 <= fraction < 1:
        raise SplitError(f"data.val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val_keys: set[tuple[int | None, str]] = set()

    def pick(keys: list[str]) -> list[str]:
        k = min(max(1, round(fraction * len(keys))), len(keys) - 1)
        return [keys[j] for j in rng.permutation(len(keys))[:k]]

    grouped = all(GROUP.search(vid) for vid in train.video_ids)
    if fraction > 0 and grouped:
        val_keys = {(None, g) for g in pick(sorted({group_key(v) for v in train.video_ids}))}
    elif fraction > 0:
        groups: dict[int, set[str]] = {}
        for vid, lab in zip(train.video_ids, train.labels):
            groups.setdefault(lab, set()).add(group_key(vid))
        for lab in sorted(groups):
            val_keys.update((lab, g) for g in pick(sorted(groups[lab])))
    new_train, val = Part(), Part()
    for vid, lab in zip(train.video_ids, train.labels):
        key = (None if grouped else lab, group_key(vid))
        dest = val if key in val_keys else new_train
        dest.video_ids.append(vid)
        dest.labels.append(lab)
    return new_train, val


def group_key(video_id: str) -> str:
    """UCF group (clips of one source video) of a video id, or the id itself."""
    m = GROUP.search(video_id)
    return f"g{m.group(1)}" if m else video_id


def read_split(fmt: str, folder: str | Path, split: int = 1, val_fraction: float = 0.1) -> Split:
    """Read a split folder into train / val / test parts with class names."""
    readers = {"ucf101": read_ucf101, "hmdb51": read_hmdb51, "list": read_list}
    if fmt not in readers:
        raise SplitError(f"data.split_format must be one of {SPLIT_FORMATS}, got {fmt!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise SplitError(f"split folder {folder} does not exist (data.splits)")
    names, train, test = readers[fmt](folder, int(split))
    if not train.video_ids:
        raise SplitError(f"split {split} in {folder} lists no training videos")
    empty = [n for k, n in enumerate(names) if k not in set(train.labels)]
    if empty:
        log.warning(f"warning: split {split} in {folder} has no training videos for {len(empty)} of "
                    f"{len(names)} classes: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; "
                    "the model can never predict them")
    train, val = hold_out(train, val_fraction)
    return Split(names, train, val, test)


def split_from_config(cfg: dict) -> Split:
    data = cfg.get("data", {})
    if not data.get("splits"):
        raise SplitError("the pipeline has no data.splits (the split folder)")
    return read_split(data.get("split_format", "ucf101"), data["splits"], data.get("split", 1),
                      data.get("val_fraction", 0.1))


def ids_checksum(video_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(video_ids).encode()).hexdigest()[:16]


def split_identity(split: Split, cfg: dict) -> dict:
    """What a model was trained and scored on: split number, validation fraction and a checksum of
    each part's videos, so scores or fusions made on another split are refused, not mixed."""
    data = cfg.get("data", {})
    return {"split_format": data.get("split_format", "ucf101"), "split": int(data.get("split", 1)),
            "val_fraction": float(data.get("val_fraction", 0.1)),
            **{f"{p}_ids": ids_checksum(split.part(p).video_ids) for p in PARTS}}


def check_same_split(trained: dict | None, now: dict, what: str) -> None:
    """Raise SplitError naming both when `now` differs from the split `what` was made with."""
    if not trained or trained == now:
        return
    def show(d):
        return f"split {d.get('split')} ({d.get('split_format')}), val_fraction {d.get('val_fraction')}"
    same_settings = all(trained.get(k) == now.get(k) for k in ("split_format", "split", "val_fraction"))
    detail = " (same settings, but the split files list other videos)" if same_settings else ""
    raise SplitError(f"{what} was made with {show(trained)}; the pipeline now asks for {show(now)}{detail}. "
                     "Scoring it on another split would mix its training videos into the test; use the same "
                     "data.split / data.val_fraction / split files, or retrain")


# ---------------------------------------------------------------- labels

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
    except (ValueError, IndexError) as e:
        raise SplitsError(f"--splits {folder}: {e}") from None
    raise SplitsError(f"--splits {folder}: neither a UCF-101 ucfTrainTestlist folder (classInd.txt, "
                      "trainlistNN.txt, testlistNN.txt) nor an HMDB-51 split folder (<class>_test_splitN.txt)")
