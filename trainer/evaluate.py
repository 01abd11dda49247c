"""The paper's test protocol for one stream, producing per-video class scores.

For each video: `eval.segments` (25) evenly spaced frames (spatial) or L-flow stacks
(temporal), each as one center crop or ten crops (corners + center, and their mirrors with
flow x inverted); the softmax is averaged over all of them. The result goes to
{out}/<stream>/scores_<part>.npz, which the fusion step reads.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

from flowprep.store import Store
from trainer.config import ConfigError
from trainer.data import ProtocolDataset, make_loader
from trainer.models import build_model
from trainer.scores import Scores, save_scores
from trainer.splits import PARTS, check_videos, split_from_config
from trainer.train import image_logits, pick_device, stream_config

EVAL_DEFAULTS = dict(segments=25, crops="center", batch_size=32)


def load_best(out: str | Path, stream: str) -> dict:
    path = Path(out) / stream / "best.pt"
    if not path.is_file():
        raise ConfigError(f"no trained {stream} model at {path}; run `python -m trainer train --stream {stream}` first")
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def predict(model, loader, device, stream: str, mean_subtraction: bool, n_videos: int, n_classes: int,
            show: bool = True) -> np.ndarray:
    """Softmax averaged per video over every (sample, crop) the loader yields for it."""
    model.eval()
    # Sums stay on the device: no host sync per batch, so the GPU queue stays full.
    sums = torch.zeros(n_videos, n_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_videos, dtype=torch.float64, device=device)
    with click.progressbar(loader, label=f"{stream} test protocol", file=sys.stderr, hidden=not show) as bar:
        for x, j in bar:
            j = j.to(device, non_blocking=True)
            probs = image_logits(model, x, device, stream, mean_subtraction).softmax(-1).mean(1).double()
            sums.index_add_(0, j, probs)
            counts.index_add_(0, j, torch.ones_like(j, dtype=torch.float64))
    return (sums / counts.clamp(min=1)[:, None]).cpu().numpy()


def score_stream(cfg: dict, stream: str, part: str = "test", device: str | None = None, show: bool = True) -> Scores:
    """Score every video of `part` (test | train | val) with {out}/<stream>/best.pt; writes scores_<part>.npz.

    Crop size, flow length and mean subtraction come from the checkpoint (what the model was
    trained with); segments, crops and batch size from [eval]; videos missing from the store
    are an error, or left out with a warning when data.skip_missing is set.
    """
    if part not in PARTS:
        raise ConfigError(f"part must be one of {PARTS}, got {part!r}")
    out = Path(cfg.get("out", "runs/default"))
    ck = load_best(out, stream)
    trained = ck["stream_config"]
    args = stream_config(cfg, stream)
    ev = {**EVAL_DEFAULTS, **cfg.get("eval", {})}
    if ev["crops"] not in ("center", "ten"):
        raise ConfigError(f"eval.crops must be 'center' or 'ten', got {ev['crops']!r}")
    dev = pick_device(device or args["device"])

    split = split_from_config(cfg)
    if list(split.class_names) != list(ck["class_names"]):
        raise ConfigError(f"the split's {len(split.class_names)} classes differ from the {len(ck['class_names'])} "
                          f"the {stream} model in {out / stream} was trained on; check data.splits / data.split")
    store = Store(cfg["data"]["store"])
    videos, counts = check_videos(store, split.part(part), bool(cfg["data"].get("skip_missing", False)), f"{part} ",
                                  need_rgb=stream == "spatial")

    model = build_model(ck["arch"], ck["num_classes"], ck["in_channels"], dropout=0.0)
    model.load_state_dict(ck["model"])
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dataset = ProtocolDataset(store.root, videos.video_ids, videos.labels, counts, stream=stream,
                              crop_size=trained["crop_size"], flow_length=trained["flow_length"],
                              samples=int(ev["segments"]), crops=ev["crops"])
    loader = make_loader(dataset, range(len(dataset)), int(ev["batch_size"]), int(args["workers"]), dev)
    probs = predict(model, loader, dev, stream, bool(trained["mean_subtraction"]), len(videos),
                    len(ck["class_names"]), show)
    scores = Scores(videos.video_ids, videos.labels, list(ck["class_names"]), probs)
    save_scores(out / stream / f"scores_{part}.npz", scores)
    return scores
