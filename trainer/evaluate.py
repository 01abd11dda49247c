"""The paper's test protocol for one stream, producing per-video class scores.

For each video: `eval.segments` (25) evenly spaced samples of the stream's input (frames, flow
stacks, ...), each as one center crop or ten crops (corners + center, and their mirrors with
the input's flip applied, e.g. flow x inverted); the softmax is averaged over all of them. The
result goes to {out}/<stream>/scores_<part>.npz, which the fusion step reads, with a record of
what it was computed on (checkpoint, split, protocol) so stale scores are refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowprep.store import Store
from trainer.checkpoint import epoch_of, load_best
from trainer.config import resolve_stream, stream_settings
from trainer.data import ProtocolDataset, make_loader
from trainer.models import build_model, head
from trainer.scores import Scores, save_scores, scores_file
from core.splits import PARTS, check_same_split, split_from_config, split_identity
from trainer.tasks import check_videos
from trainer.streams import get_input
from trainer.forward import image_logits
from trainer.utils import pick_device, setup_device
from core.progress import Progress
from core.schema import ConfigError, Pipeline, require_pipeline


@torch.no_grad()
def predict(model, loader, device, kind, length: int, mean_subtraction: bool, n_videos: int, n_classes: int,
            show: bool = True, label: str = "test protocol", arch: str | None = None,
            classes: slice = slice(None)) -> tuple[np.ndarray, np.ndarray | None]:
    """(softmax, pooled features) averaged per video over every (sample, crop) the loader yields
    for it; features only when `arch` is given (they are the classifier's input). `classes`:
    the head to read (a multi-task network's dataset), the softmax taken over it alone."""
    model.eval()
    # Sums stay on the device: no host sync per batch, so the GPU queue stays full.
    sums = torch.zeros(n_videos, n_classes, dtype=torch.float64, device=device)
    feats = None
    counts = torch.zeros(n_videos, dtype=torch.float64, device=device)
    hook = None
    if arch is not None:
        seen = {}
        hook = head(model, arch).register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with Progress(len(loader), label, unit="batches", show=show) as bar:
            for x, j in loader:
                j = j.to(device, non_blocking=True)
                b, k = x.shape[:2]
                logits = image_logits(model, x, device, kind, length, mean_subtraction)[..., classes]
                probs = logits.softmax(-1).mean(1).double()
                sums.index_add_(0, j, probs)
                counts.index_add_(0, j, torch.ones_like(j, dtype=torch.float64))
                if hook is not None:
                    f = seen["x"].float().view(b, k, -1).mean(1).double()
                    if feats is None:
                        feats = torch.zeros(n_videos, f.shape[1], dtype=torch.float64, device=device)
                    feats.index_add_(0, j, f)
                bar.update(1)
    finally:
        if hook is not None:
            hook.remove()
    n = counts.clamp(min=1)[:, None]
    return (sums / n).cpu().numpy(), (feats / n).cpu().numpy() if feats is not None else None


def load_stream_model(ck: dict, device: torch.device) -> torch.nn.Module:
    model = build_model(ck["arch"], ck["num_classes"], ck["in_channels"], dropout=0.0)
    model.load_state_dict(ck["model"])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def provenance(cfg: dict, ck: dict, part: str, split_id: dict) -> dict:
    """What a score file was computed from; `--reuse-scores` refuses files whose record differs."""
    ev = cfg["eval"]
    return {"stream": ck["stream"], "input": ck.get("input"), "checkpoint_epoch": epoch_of(ck), "part": part,
            "split": split_id, "segments": ev["segments"], "crops": ev["crops"], "store": str(cfg["data"]["store"])}


def score_stream(cfg: Pipeline, stream: str, part: str = "test", device: str | None = None, show: bool = True,
                 dataset: str | None = None) -> Scores:
    """Score every video of `part` (test | train | val) with {out}/<stream>/best.pt; writes scores_<part>.npz.

    Input, crop size, flow length and mean subtraction come from the checkpoint (what the model
    was trained with); segments, crops and batch size from [eval]. Scoring on another split than
    the model was trained with is an error naming both; videos missing from the store are an
    error, or left out with a warning when data.skip_missing is set. A multi-task stream is
    scored on one of its datasets (`dataset`), with that dataset's head.
    """
    if part not in PARTS:
        raise ConfigError(f"part must be one of {PARTS}, got {part!r}")
    cfg = require_pipeline(cfg, "score_stream")
    name = resolve_stream(cfg, stream)
    args = stream_settings(cfg, name)
    out = Path(cfg["out"])
    ck = load_best(out, name)
    kind = get_input(ck.get("input", "rgb" if ck["in_channels"] == 3 else "flow"))
    length = int(ck.get("flow_length", ck["stream_config"].get("flow_length", 10)))
    mean_subtraction = bool(ck.get("mean_subtraction", ck["stream_config"].get("mean_subtraction", True)))
    crop = int(ck.get("crop_size", ck["stream_config"]["crop_size"]))
    ev = cfg["eval"]
    dev = pick_device(device or args["device"])
    setup_device(dev, args["threads"], args["deterministic"])

    tasks = ck.get("tasks") or [{"name": "", "offset": 0, "classes": ck["class_names"], "split": ck.get("split")}]
    if len(tasks) > 1:
        known = [t["name"] for t in tasks]
        if dataset not in known:
            raise ConfigError(f"the {name} stream was trained on several datasets ({', '.join(known)}); say which to "
                              f"score with --dataset (fusion.dataset)")
        task = tasks[known.index(dataset)]
        data = cfg["datasets"][dataset]
    else:
        task, data, dataset = tasks[0], cfg["data"], ""
    split = split_from_config({"data": data})
    if list(split.class_names) != list(task["classes"]):
        raise ConfigError(f"the split's {len(split.class_names)} classes differ from the {len(task['classes'])} "
                          f"the {name} model in {out / name} was trained on; check data.splits / data.split")
    split_id = split_identity(split, {"data": data})
    check_same_split(task.get("split"), split_id, f"the {name} model in {out / name}")
    store = Store(data["store"])
    videos, counts = check_videos(store, split.part(part), data["skip_missing"], f"{part} ", kind.reads)
    head_classes = slice(task["offset"], task["offset"] + len(task["classes"]))

    model = load_stream_model(ck, dev)
    samples = ProtocolDataset(store.root, videos.video_ids, videos.labels, counts, kind=kind, crop_size=crop,
                              flow_length=length, samples=int(ev["segments"]), crops=ev["crops"])
    loader = make_loader(samples, range(len(samples)), int(ev["batch_size"]), int(args["workers"]), dev)
    probs, feats = predict(model, loader, dev, kind, length, mean_subtraction, len(videos), len(task["classes"]),
                           show, label=f"{name} {part} (test protocol)", arch=ck["arch"], classes=head_classes)
    meta = {**provenance(cfg, ck, part, split_id), "dataset": dataset, "store": str(data["store"])}
    scores = Scores(videos.video_ids, videos.labels, list(task["classes"]), probs, meta, feats)
    save_scores(scores_file(out / name, part, dataset), scores)
    return scores
