"""Per-video class scores of one stream on one part of a split, saved as .npz.

The fusion step works from these files alone, so it can be re-run without the networks.
File keys: video_ids (str), labels (int64), class_names (str), scores (float32, N x C, the
softmax averaged over the test protocol's frames/stacks and crops).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Scores:
    video_ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        n, c = len(self.video_ids), len(self.class_names)
        if self.labels.shape != (n,) or self.scores.shape != (n, c):
            raise ValueError(f"scores for {n} videos and {c} classes need labels ({n},) and scores ({n}, {c}); "
                             f"got {self.labels.shape} and {self.scores.shape}")


def save_scores(path: str | Path, s: Scores) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{uuid.uuid4().hex}.npz")
    np.savez(tmp, video_ids=np.array(s.video_ids, dtype=str), labels=s.labels,
             class_names=np.array(s.class_names, dtype=str), scores=s.scores)
    os.replace(tmp, path)
    return path


def load_scores(path: str | Path) -> Scores:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scores at {path}; run `python -m trainer fuse-eval` (it evaluates the streams first)")
    with np.load(path, allow_pickle=False) as z:
        return Scores([str(v) for v in z["video_ids"]], z["labels"], [str(c) for c in z["class_names"]], z["scores"])
