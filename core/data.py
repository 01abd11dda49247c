"""The [data] pipeline section: where the videos, the store and the split files are.

Read by `flowprep extract` (videos, store, splits) and by every trainer command; [datasets.NAME]
sections (the datasets of a multi-task stream) have the same keys but `videos`.
"""
from __future__ import annotations

from core.schema import Key, Section, boolean, integer, number
from core.splits import SPLIT_FORMATS

DATA = Section("data", {
    "videos": Key("", "Folder of source videos (flowprep extract --videos).", flags=None),
    "store": Key("", "The flowprep store to train from.", flags=("--store", "--data-path", "--data-root")),
    "split_format": Key("ucf101", "ucf101: classInd.txt + trainlistNN/testlistNN; hmdb51: <class>_test_splitN.txt; "
                        "list: train.txt / test.txt of '<path> <label>'.", choices=SPLIT_FORMATS, flags=None),
    "splits": Key("", "Folder of the split files.", flags=None),
    "split": Key(1, "Split number (UCF-101 and HMDB-51: 1-3).", integer, min=1),
    "val_fraction": Key(0.1, "Share of the training split's groups held out to choose the best epoch and the "
                        "fusion (never the test split).", number, min=0, max=0.9, flags=None),
    "skip_missing": Key(False, "Leave out videos missing or incomplete in the store (with a warning) instead of "
                        "stopping.", boolean),
}, doc="Where the videos, the store and the split files are.")

DATASET = Section("datasets.NAME", {k: v for k, v in DATA.keys.items() if k != "videos"},
                  doc="One dataset of a multi-task stream: its store and split files, as in [data].")
