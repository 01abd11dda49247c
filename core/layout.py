"""The store's names: what `flowprep` writes and every reader of a store (the trainer, verify,
MMAction2's loaders) finds there. The layouts themselves are described in flowprep/store.py.
"""
from __future__ import annotations

# Store-level files.
STORE_VERSION = 1              # store.json's "version"
STORE_INFO = "store.json"      # format and extraction parameters; labels and MMAction2 settings
MANIFEST = "manifest.jsonl"    # one record per attempt, the last one wins
LIST_FILE = "videos.txt"       # `<video_dir> <total_frames> <label>` of every video
EXPECTED = "expected.json"     # every video any job on the store was asked for (id -> source)
FINDINGS = "verify.json"       # the last verify's findings, redone by the next extract
LISTS = "lists"                # where stores before the lists moved to the top kept them (removed)
LOGS = ".logs"                 # Ray's logs of a job whose workers died
LOCK = ".flowprep.lock"        # the job holding the store
META = "meta.json"             # per video (JPEG store); HDF5 keeps the same keys as attributes

FORMATS = ("jpeg", "hdf5")
FLOW_CODECS = ("jpeg", "raw")
DIRECTIONS = ("forward", "both")
# Frame kinds, and the flow kinds of each direction (backward?).
KINDS = ("img", "flow_x", "flow_y", "bflow_x", "bflow_y")
FLOW_KINDS = {False: ("flow_x", "flow_y"), True: ("bflow_x", "bflow_y")}
# A video whose record has one of these statuses is in the store (partial: its source was cut short).
DONE = ("ok", "partial")
# store.json keys that are not extraction parameters: a resumed job need not match them.
LISTING_KEYS = ("labels_from", "classes", "splits", "mmaction2", "lists")

# What MMAction2's RawframeDataset needs to open exactly a JPEG store's files (store.json "mmaction2").
MMACTION2 = {
    "rgb": {"modality": "RGB", "filename_tmpl": "img_{:05}.jpg", "start_index": 1},
    "flow": {"modality": "Flow", "filename_tmpl": "flow_{}_{:05d}.jpg", "start_index": 1},
}


def frame_name(kind: str, index: int) -> str:
    """File name of frame `index` (0-based) for kind 'img', 'flow_x', 'flow_y', 'bflow_x' or 'bflow_y'
    (files are 1-based)."""
    return f"{kind}_{index + 1:05d}.jpg"
