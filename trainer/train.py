"""Train one stream: `main`, after torchvision's references/video_classification/train.py; the
loop itself is trainer/fit.py's, shared with joint training.

    python -m twostream train --stream temporal --pipeline pipelines/ucf101.toml
    torchrun --nproc-per-node 8 -m twostream train --stream spatial --pipeline pipelines/ucf101.toml

What a stream sees comes from its input kind (trainer/streams.py), its settings from the
pipeline ([train] < [streams.NAME], trainer/config.py). `batch_size` is the global batch: N
processes each take batch_size / N of every batch, so the learning rate does not depend on
the number of GPUs (printed at start). The run directory {out}/<stream>/ is described, and
kept consistent across kills, in trainer/checkpoint.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from core.schema import ConfigError, Pipeline, require_pipeline
from core.splits import split_identity
from flowprep.store import Store
from trainer.config import stream_settings
from trainer.data import ClipDataset, training_loaders
from trainer.fit import fit, plain
from trainer.forward import forward
from trainer.models import build_model, freeze_backbone
from trainer.streams import FLOW_CENTER, FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD, Input, get_input
from trainer.tasks import check_videos, class_names, tasks_for
from trainer.utils import setup_process

log = logging.getLogger(__name__)


def normalization(kind: Input, length: int, mean_subtraction: bool) -> dict:
    """How the network's input is made from stored uint8 values (saved with every checkpoint)."""
    if kind.is_flow:
        return {"input": kind.name, "flow_length": length, "flow_center": FLOW_CENTER, "flow_scale": FLOW_SCALE,
                "mean_subtraction": mean_subtraction, "flip_negates": "channels 0, 2, 4, ... (flow x): q -> 255 - q"}
    return {"input": kind.name, "flow_length": length, "rgb_mean": [255 * m for m in IMAGENET_MEAN],
            "rgb_std": [255 * s for s in IMAGENET_STD], "channel_order": "RGB"}


def check_crop_size(store: Store, video_id: str, crop: int) -> None:
    """Training crops are cut from the frame's short side: a larger crop would be a silent upscale."""
    with store.open(video_id) as v:
        w, h = v.size
    if crop > min(w, h):
        raise ConfigError(f"crop_size {crop} is larger than the stored frames ({w}x{h}); use a crop_size of at most "
                          f"{min(w, h)}, or re-extract at a larger --size")


def main(cfg: Pipeline, stream: str) -> dict:
    """Train `stream` as the pipeline `cfg` says; returns a summary (best val accuracy, paths)."""
    cfg = require_pipeline(cfg, "trainer.train.main")
    args = stream_settings(cfg, stream)
    name, kind, length = args["name"], get_input(args["input"]), args["flow_length"]
    data = cfg["data"]
    if not data["store"]:
        raise ConfigError("the pipeline has no data.store (the flowprep store to train from)")
    rank, world, local, device, joined = setup_process(args)
    seed = int(args["seed"])
    run_dir = Path(cfg["out"]) / name

    # Everything that can be wrong with the inputs fails here, before any training.
    tasks = tasks_for(cfg, args["datasets"])
    classes = class_names(tasks)
    parts = {"train": ([], [], [], []), "val": ([], [], [], [])}  # ids, labels, counts, store roots
    for t in tasks:
        store = Store(t.data["store"])
        for part, (ids, labels, counts, roots) in parts.items():
            what = f"{t.name + ' ' if t.name else ''}{'training' if part == 'train' else 'validation'} "
            kept, n = check_videos(store, t.split.part(part), t.data["skip_missing"], what, kind.reads)
            ids += kept.video_ids
            labels += [y + t.offset for y in kept.labels]
            counts += n
            roots += [str(store.root)] * len(kept.video_ids)
    train_ids, train_labels, train_counts, train_roots = parts["train"]
    val_ids, val_labels, val_counts, val_roots = parts["val"]
    if not train_ids:
        raise ConfigError(f"no training videos left for split {data['split']}")
    check_crop_size(Store(train_roots[0]), train_ids[0], args["crop_size"])
    in_ch = kind.channels(length)
    model = build_model(args["arch"], len(classes), in_ch, args["dropout"], args["pretrained"]).to(device)
    params = freeze_backbone(model, args["arch"]) if args["freeze"] == "backbone" else model.parameters()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda" and not args["freeze_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same keys; SyncBN needs CUDA

    common = dict(kind=kind, crop_size=args["crop_size"], flow_length=length)
    train_set = ClipDataset(train_roots, train_ids, train_labels, train_counts,
                            train=True, segments=args["segments"], seed=seed, **common)
    val_set = ClipDataset(val_roots, val_ids, val_labels, val_counts, train=False, segments=args["segments"],
                          **common)
    loaders = training_loaders(train_set, val_set, int(args["batch_size"]), int(args["workers"]), device, seed, rank,
                               world)
    per_rank = int(args["batch_size"]) // world
    task_of = torch.tensor([k for k, t in enumerate(tasks) for _ in t.classes], device=device)

    def logits_fn(net):
        def run(x, y):
            logits = forward(net, x, device, kind, args)
            if len(tasks) > 1:  # multi-task: each video's softmax over its own dataset's head only
                logits = logits.masked_fill(task_of[None, :] != task_of[y][:, None], float("-inf"))
            return logits
        return run

    meta = {"arch": args["arch"], "stream": name, "input": kind.name, "flow_length": length,
            "mean_subtraction": args["mean_subtraction"], "crop_size": args["crop_size"], "in_channels": in_ch,
            "num_classes": len(classes), "class_names": classes,
            "normalization": normalization(kind, length, args["mean_subtraction"]),
            "split": split_identity(tasks[0].split, {"data": tasks[0].data}),
            "tasks": [{"name": t.name, "offset": t.offset, "classes": t.classes,
                       "split": split_identity(t.split, {"data": t.data})} for t in tasks],
            "config": plain(cfg), "stream_config": plain(args)}
    if rank == 0:
        log.info(f"{name}: input {kind.name} ({in_ch} channels), {args['arch']} on {device} x{world}, "
                 f"{len(train_ids)} train / {len(val_ids)} val videos, {len(classes)} classes"
                 + (f" in {len(tasks)} datasets ({', '.join(t.name for t in tasks)})" if len(tasks) > 1 else "")
                 + "; batch "
                 f"{args['batch_size']} = {per_rank} per process x {world}; {len(loaders[1])} steps per epoch")
    identity = {"arch": args["arch"], "in_channels": in_ch, "class_names": classes}
    summary = fit(model, params, loaders, device, {**args, "section": f"streams.{name}"}, run_dir, meta, logits_fn,
                  identity, rank=rank, world=world, local=local)
    if joined:
        dist.destroy_process_group()
    return {"stream": name, **summary}
