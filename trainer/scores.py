"""Per-video class scores of one stream on one part of a split, saved as .npz: the seam between
evaluation and fusion, so fusion can be re-run without the networks.

File keys: video_ids (str), labels (int64), class_names (str), scores (float32, N x C, the
softmax averaged over the test protocol's frames/stacks and crops), features (float16, N x D,
the backbone's pooled features averaged the same way, for feature-level fusion; optional) and
meta (a JSON string: what the scores were computed from, see trainer.evaluate.provenance).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import save_atomic


def scores_file(run_dir: Path, part: str, dataset: str = "") -> Path:
    """A stream's (or joint network's) scores of `part`: scores_<part>.npz, or
    scores_<dataset>_<part>.npz for one dataset of a multi-task stream."""
    return Path(run_dir) / (f"scores_{dataset}_{part}.npz" if dataset else f"scores_{part}.npz")


@dataclass
class Scores:
    video_ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    meta: dict = field(default_factory=dict)
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        n, c = len(self.video_ids), len(self.class_names)
        if self.labels.shape != (n,) or self.scores.shape != (n, c):
            raise ValueError(f"scores for {n} videos and {c} classes need labels ({n},) and scores ({n}, {c}); "
                             f"got {self.labels.shape} and {self.scores.shape}")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[0] != n:
                raise ValueError(f"features for {n} videos must be N x D, got {self.features.shape}")


def save_scores(path: str | Path, s: Scores) -> Path:
    extra = {} if s.features is None else {"features": s.features.astype(np.float16)}
    return save_atomic(path, lambda tmp: np.savez(
        tmp, video_ids=np.array(s.video_ids, dtype=str), labels=s.labels,
        class_names=np.array(s.class_names, dtype=str), scores=s.scores,
        meta=np.array(json.dumps(s.meta, sort_keys=True)), **extra))


def load_scores(path: str | Path) -> Scores:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scores at {path}; run `python -m twostream fuse-eval` (it evaluates the streams first)")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        features = z["features"].astype(np.float32) if "features" in z.files else None
        return Scores([str(v) for v in z["video_ids"]], z["labels"], [str(c) for c in z["class_names"]], z["scores"],
                      meta, features)
