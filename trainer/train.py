"""Train one stream: flat `train_one_epoch`, `evaluate` and `main`, after torchvision's
references/video_classification/train.py.

    python -m trainer train --stream temporal --pipeline pipelines/ucf101.toml
    torchrun --nproc-per-node 8 -m trainer train --stream spatial --pipeline pipelines/ucf101.toml

What a stream sees comes from its input kind (trainer/streams.py), its settings from the
pipeline ([train] < [streams.NAME], trainer/config.py). `batch_size` is the global batch: N
processes each take batch_size / N of every batch, so the learning rate does not depend on
the number of GPUs (printed at start). The run directory {out}/<stream>/ is described, and
kept consistent across kills, in trainer/checkpoint.py.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from flowprep.store import Store
from trainer import checkpoint as C
from trainer import transforms as T
from trainer.config import stream_settings
from trainer.data import ClipDataset, training_loaders
from trainer.models import build_model, freeze_backbone, freeze_bn
from trainer.splits import check_videos, class_names, split_identity, tasks_for
from trainer.streams import FLOW_CENTER, FLOW_SCALE, IMAGENET_MEAN, IMAGENET_STD, Input, get_input
from trainer.utils import init_distributed, pick_device, reduce_sum, seed_everything, setup_device, world_size
from twostream.pipeline import validate
from twostream.progress import Progress
from twostream.schema import ConfigError

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


# ---------------------------------------------------------------- optimisation

def make_scheduler(optimizer: torch.optim.Optimizer, c: dict, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: linear warmup over warmup_epochs, then step (x lr_gamma at each
    epoch in lr_steps), cosine to zero at the last epoch, or constant."""
    warm, total = int(c["warmup_epochs"] * iters), int(c["epochs"]) * iters

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if c["schedule"] == "step":
            return c["lr_gamma"] ** sum(step // iters >= s for s in c["lr_steps"])
        if c["schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, c: dict) -> torch.optim.Optimizer:
    params = list(params)
    if c["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    return torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"])


# ---------------------------------------------------------------- one step, one epoch

def image_logits(model: nn.Module, x: torch.Tensor, device: torch.device, kind: Input, length: int,
                 mean_subtraction: bool, amp: bool = True, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch (K segments or crops) -> float32 class logits [B, K, classes].

    `flips` (bool [B]): the training flips the loader chose, applied here to the whole batch."""
    x = x.to(device, non_blocking=True)
    if flips is not None:
        x = T.flip_batch(x, flips.to(device, non_blocking=True), kind.negate_on_flip(length))
    b, k = x.shape[:2]
    x = kind.to_network(x.flatten(0, 1), length, mean_subtraction)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(x)
    return logits.float().view(b, k, -1)


def forward(model: nn.Module, x, device: torch.device, kind: Input, args: dict) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch (or (batch, flips) from a training loader) -> class logits
    [B, classes], averaged over the K segments."""
    x, flips = x if isinstance(x, (tuple, list)) else (x, None)
    return image_logits(model, x, device, kind, args["flow_length"], args["mean_subtraction"], args["amp"],
                        flips).mean(1)


def train_one_epoch(model, criterion, optimizer, scheduler, loader, device, epoch, args, logits_fn,
                    show=True) -> dict:
    """One pass over `loader`; `logits_fn(x, y)` -> class logits [B, classes] of a batch."""
    name = args["name"]
    model.train()
    if args["freeze_bn"] or args["freeze"] == "backbone":
        freeze_bn(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, step, start = 0, 0, time.perf_counter()
    status = ""

    def check(step: int) -> str:
        loss = loss_sum.item() / max(step, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"{name}: the loss became {loss} in epoch {epoch + 1} before step {step}; "
                                f"lower the learning rate (streams.{name}.lr, now {args['lr']}), add warmup "
                                f"(train.warmup_epochs) or clip gradients (train.clip_grad)")
        return (f"loss {loss:.3f} acc {correct.item() / max(seen, 1):.3f} "
                f"{seen * world_size() / (time.perf_counter() - start):.1f} samples/s")

    with Progress(len(loader), f"{name} epoch {epoch + 1}", unit="steps", show=show) as bar:
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            logits = logits_fn(x, y)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args["clip_grad"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args["clip_grad"])
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            if step % args["print_freq"] == 0:  # .item() syncs; not every step, so the GPU queue stays full
                status = check(step)
            bar.update(1, status)
    check(step)
    elapsed = time.perf_counter() - start
    totals = reduce_sum([loss_sum.item(), correct.item(), seen, step])
    return {"train_loss": totals[0] / max(totals[3], 1), "train_acc": totals[1] / max(totals[2], 1),
            "samples_per_s": totals[2] / elapsed, "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model, criterion, loader, device, logits_fn) -> dict:
    """Clip-level loss and accuracy (center crop, segment middles); the full test protocol is evaluate.py."""
    model.eval()
    # Summed on the device and read once: .item() per batch would sync the GPU every step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        y = y.to(device, non_blocking=True)
        logits = logits_fn(x, y)
        loss_sum += criterion(logits, y).double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_sum, correct, seen = reduce_sum([loss_sum.item(), correct.item(), seen])
    return {"val_loss": loss_sum / max(seen, 1), "val_acc": correct / max(seen, 1)}


# ---------------------------------------------------------------- main

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


def main(cfg: dict, stream: str) -> dict:
    """Train `stream` as the pipeline `cfg` says; returns a summary (best val accuracy, paths)."""
    cfg = validate(cfg)
    args = stream_settings(cfg, stream)
    name, kind, length = args["name"], get_input(args["input"]), args["flow_length"]
    data = cfg["data"]
    if not data["store"]:
        raise ConfigError("the pipeline has no data.store (the flowprep store to train from)")
    joined = not dist.is_initialized()
    rank, world, local = init_distributed(args["device"])
    joined = joined and dist.is_initialized()  # we joined the group, so we leave it at the end
    device = pick_device(args["device"], local)
    setup_device(device, args["threads"], args["deterministic"])
    seed = int(args["seed"])
    seed_everything(seed + rank)
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
    try:
        sampler, loader, val_loader = training_loaders(train_set, val_set, int(args["batch_size"]),
                                                       int(args["workers"]), device, seed, rank, world)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    per_rank = int(args["batch_size"]) // world
    task_of = torch.tensor([k for k, t in enumerate(tasks) for _ in t.classes], device=device)

    def logits_fn(net):
        def run(x, y):
            logits = forward(net, x, device, kind, args)
            if len(tasks) > 1:  # multi-task: each video's softmax over its own dataset's head only
                logits = logits.masked_fill(task_of[None, :] != task_of[y][:, None], float("-inf"))
            return logits
        return run

    optimizer = make_optimizer(params, args)
    scheduler = make_scheduler(optimizer, args, len(loader))
    criterion = nn.CrossEntropyLoss()
    meta = {"arch": args["arch"], "stream": name, "input": kind.name, "flow_length": length,
            "mean_subtraction": args["mean_subtraction"], "crop_size": args["crop_size"], "in_channels": in_ch,
            "num_classes": len(classes), "class_names": classes,
            "normalization": normalization(kind, length, args["mean_subtraction"]),
            "split": split_identity(tasks[0].split, {"data": tasks[0].data}),
            "tasks": [{"name": t.name, "offset": t.offset, "classes": t.classes,
                       "split": split_identity(t.split, {"data": t.data})} for t in tasks],
            "config": _plain(cfg), "stream_config": _plain(args)}

    start_epoch, best_acc, best_epoch, records = 0, -1.0, None, []
    resume = args["resume"]
    last_path = Path(resume) if isinstance(resume, str) else run_dir / C.LAST
    if rank == 0:
        C.start_run(run_dir)
    if resume and last_path.is_file():
        ck = C.load_checkpoint(last_path, "checkpoint to resume")
        if (ck["arch"], ck["in_channels"], ck["class_names"]) != (args["arch"], in_ch, classes):
            raise ConfigError(f"{last_path} was trained as {ck['arch']} with {ck['in_channels']} input channels and "
                              f"{len(ck['class_names'])} classes; this run asks for {args['arch']}, {in_ch} and "
                              f"{len(classes)}. Use another --out, or drop --resume to start over.")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, best_acc, best_epoch = ck["epoch"] + 1, ck["best_acc"], ck.get("best_epoch")
        records = list(ck.get("log", C.read_log(run_dir / C.LOG)[:start_epoch]))
        C.set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
        if rank == 0:
            if last_path == run_dir / C.LAST:
                C.repair(run_dir, ck)  # a kill between last.pt and best.pt / log.jsonl
            log.info(f"{name}: resuming from {last_path} after epoch {start_epoch}")
    elif resume and isinstance(resume, str):
        raise ConfigError(f"--resume {resume}: no such checkpoint")
    elif resume and rank == 0:
        log.info(f"{name}: nothing to resume in {run_dir}; starting from scratch")

    model_ddp = model
    if world > 1:
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    if rank == 0:
        log.info(f"{name}: input {kind.name} ({in_ch} channels), {args['arch']} on {device} x{world}, "
                 f"{len(train_ids)} train / {len(val_ids)} val videos, {len(classes)} classes"
                 + (f" in {len(tasks)} datasets ({', '.join(t.name for t in tasks)})" if len(tasks) > 1 else "")
                 + "; batch "
                 f"{args['batch_size']} = {per_rank} per process x {world}; {len(loader)} steps per epoch")

    for epoch in range(start_epoch, int(args["epochs"])):
        sampler.set_epoch(epoch)
        record = {"epoch": epoch + 1}
        record.update(train_one_epoch(model_ddp, criterion, optimizer, scheduler, loader, device, epoch, args,
                                      logits_fn(model_ddp), show=rank == 0))
        if val_loader is not None:
            # The plain module: DDP could wait on buffer syncs across ranks' unequal eval shares.
            record.update(evaluate(model, criterion, val_loader, device, logits_fn(model)))
        best_acc, best_epoch = C.commit_epoch(
            run_dir, epoch, record, (best_acc, best_epoch), val_loader is not None, records, world, rank,
            lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, meta)
        if rank == 0:
            log.info(f"{name} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                              if k != "epoch"))
    if world > 1:
        dist.barrier()
    if joined:
        dist.destroy_process_group()
    return {"stream": name, "out": str(run_dir), "best_acc": best_acc, "epochs": int(args["epochs"]),
            "log": records, "last": str(run_dir / C.LAST), "best": str(run_dir / C.BEST)}


def _plain(obj):
    """Config values as JSON-like primitives (safe for weights_only checkpoint loading)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
