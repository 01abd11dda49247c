"""Train one stream: flat `train_one_epoch`, `evaluate` and `main`, after torchvision's
references/video_classification/train.py.

    python -m trainer train --stream temporal --pipeline pipelines/ucf101.toml
    torchrun --nproc-per-node 8 -m trainer train --stream spatial --pipeline pipelines/ucf101.toml

`train.batch_size` is the global batch: N processes each take batch_size / N of every
batch, so the learning rate does not depend on the number of GPUs. Run dir {out}/<stream>/:
last.pt (every epoch, atomic; `--resume` continues from it exactly), best.pt (best val
accuracy), log.jsonl (one record per epoch) and curve.png.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import uuid
from pathlib import Path

import click
import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flowprep.store import Store
from trainer import transforms as T
from trainer.config import ConfigError
from trainer.data import ClipDataset, DevicePrefetcher, EpochSampler, ShardSampler, make_loader
from trainer.models import build_model, freeze_bn
from trainer.report import write_atomic
from trainer.splits import check_videos, split_from_config

STREAMS = ("spatial", "temporal")
# [train] keys with their defaults; [spatial] / [temporal] override any of them per stream.
DEFAULTS = dict(
    arch="resnet18", pretrained="", epochs=10, batch_size=32, lr=0.001, optimizer="sgd", momentum=0.9,
    weight_decay=5e-4, schedule="step", lr_steps=[6, 9], lr_gamma=0.1, warmup_epochs=0, dropout=0.5,
    workers=4, device="auto", seed=0, crop_size=224, segments=1, clip_grad=0.0, freeze_bn=False,
    flow_length=10, mean_subtraction=True, resume=False, print_freq=10,
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


# ---------------------------------------------------------------- config and setup

def stream_config(cfg: dict, stream: str) -> dict:
    """DEFAULTS, then [train], then [<stream>]; unknown keys are errors (typos would pass silently)."""
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {stream!r}")
    c = dict(DEFAULTS)
    for section in ("train", stream):
        values = cfg.get(section, {})
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(section + '.' + k for k in unknown)} in {cfg.get('_path', 'the pipeline')}; "
                              f"known: {', '.join(sorted(DEFAULTS))}")
        c.update(values)
    if c["optimizer"] not in ("sgd", "adamw"):
        raise ConfigError(f"{stream}: optimizer must be 'sgd' or 'adamw', got {c['optimizer']!r}")
    if c["schedule"] not in ("step", "cosine", "constant"):
        raise ConfigError(f"{stream}: schedule must be 'step', 'cosine' or 'constant', got {c['schedule']!r}")
    return c


def in_channels(stream: str, c: dict) -> int:
    return 3 if stream == "spatial" else 2 * int(c["flow_length"])


def init_distributed(device_pref: str) -> tuple[int, int, int]:
    """(rank, world, local_rank); joins the process group torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device_pref).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, local


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    pref = str(pref)
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {pref!r} asked for but CUDA is not available here; use --device cpu")
    if pref == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(pref)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {pref!r} (use auto, cpu, cuda or cuda:N)") from e


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


def make_optimizer(model: nn.Module, c: dict) -> torch.optim.Optimizer:
    if c["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])


# ---------------------------------------------------------------- RNG state (for exact resume)

def rng_state() -> dict:
    """Every RNG this process uses, as tensors and primitives (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            # this process's own GPU only: touching every visible GPU would open a context on each
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": list(random.getstate()[1])}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(s["python"]), None))


def all_rng_states(world: int) -> list[dict]:
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".tmp.{path.name}.{uuid.uuid4().hex}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- one step, one epoch

def image_logits(model: nn.Module, x: torch.Tensor, device: torch.device, stream: str,
                 mean_subtraction: bool) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch (K segments or crops) -> float32 class logits [B, K, classes]."""
    x = x.to(device, non_blocking=True)
    b, k = x.shape[:2]
    x = T.normalize(x.flatten(0, 1), stream, mean_subtraction)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    return logits.float().view(b, k, -1)


def forward(model: nn.Module, x: torch.Tensor, device: torch.device, stream: str, mean_subtraction: bool) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch -> class logits [B, classes], averaged over the K segments."""
    return image_logits(model, x, device, stream, mean_subtraction).mean(1)


def train_one_epoch(model, criterion, optimizer, scheduler, loader, device, epoch, stream, args, show=True) -> dict:
    model.train()
    if args["freeze_bn"]:
        freeze_bn(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, step, start = 0, 0, time.perf_counter()
    status = ""

    def check(step: int) -> str:
        loss = loss_sum.item() / max(step, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"{stream}: the loss became {loss} in epoch {epoch + 1} before step {step}; "
                                f"lower the learning rate ({stream}.lr, now {args['lr']}), add warmup "
                                f"(train.warmup_epochs) or clip gradients (train.clip_grad)")
        return (f"loss {loss:.3f} acc {correct.item() / max(seen, 1):.3f} "
                f"{seen * world_size() / (time.perf_counter() - start):.1f} samples/s")

    with click.progressbar(length=len(loader), label=f"{stream} epoch {epoch + 1}", file=sys.stderr,
                           item_show_func=lambda s: s, hidden=not show) as bar:
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            logits = forward(model, x, device, stream, args["mean_subtraction"])
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
def evaluate(model, criterion, loader, device, stream, args) -> dict:
    """Clip-level loss and accuracy (center crop, segment middles); the full test protocol is evaluate.py."""
    model.eval()
    # Summed on the device and read once: .item() per batch would sync the GPU every step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        y = y.to(device, non_blocking=True)
        logits = forward(model, x, device, stream, args["mean_subtraction"])
        loss_sum += criterion(logits, y).double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_sum, correct, seen = reduce_sum([loss_sum.item(), correct.item(), seen])
    return {"val_loss": loss_sum / max(seen, 1), "val_acc": correct / max(seen, 1)}


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- curve.png

def draw_curve(records: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Loss (left axis) and accuracies (right axis, 0..1) per epoch, drawn with OpenCV."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, w - 60, 30, h - 40
    cv2.rectangle(img, (left, top), (right, bottom), (0, 0, 0), 1)
    epochs = [r["epoch"] for r in records]
    if records:
        e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
        losses = [v for r in records for v in (r.get("train_loss"), r.get("val_loss")) if v is not None and math.isfinite(v)]
        lmax = max(losses, default=1.0) * 1.05 or 1.0
        series = [("train_loss", (200, 60, 0), lmax), ("val_loss", (255, 160, 80), lmax),
                  ("train_acc", (0, 0, 200), 1.0), ("val_acc", (0, 160, 0), 1.0)]
        for k, (key, color, vmax) in enumerate(series):
            pts = [(left + (r["epoch"] - e0) / (e1 - e0) * (right - left), bottom - r[key] / vmax * (bottom - top))
                   for r in records if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                cv2.polylines(img, [np.round(np.array(pts)).astype(np.int32)], False, color, 2, cv2.LINE_AA)
                for p in pts:
                    cv2.circle(img, (round(p[0]), round(p[1])), 3, color, -1, cv2.LINE_AA)
            cv2.putText(img, key, (left + 10 + 130 * k, top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
        cv2.putText(img, f"{lmax:.2f}", (5, top + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "1.0", (right + 5, top + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"epoch {e0}", (left, bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"epoch {e1}", (right - 60, bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    write_atomic(path, buf.tobytes())


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_log(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


# ---------------------------------------------------------------- main

def main(cfg: dict, stream: str) -> dict:
    """Train `stream` as the pipeline `cfg` says; returns a summary (best val accuracy, paths)."""
    args = stream_config(cfg, stream)
    data = cfg.get("data", {})
    if "store" not in data:
        raise ConfigError("the pipeline has no data.store (the flowprep store to train from)")
    joined = not dist.is_initialized()
    rank, world, local = init_distributed(args["device"])
    joined = joined and dist.is_initialized()  # we joined the group, so we leave it at the end
    device = pick_device(args["device"], local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed = int(args["seed"])
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    out_dir = Path(cfg.get("out", "runs/default")) / stream

    # Everything that can be wrong with the inputs fails here, before any training.
    split = split_from_config(cfg)
    store = Store(data["store"])
    skip = bool(data.get("skip_missing", False))
    rgb = stream == "spatial"
    train_part, train_counts = check_videos(store, split.train, skip, "training ", need_rgb=rgb)
    val_part, val_counts = check_videos(store, split.val, skip, "validation ", need_rgb=rgb)
    if not train_part.video_ids:
        raise ConfigError(f"no training videos left in {store.root} for split {data.get('split', 1)}")
    in_ch = in_channels(stream, args)
    model = build_model(args["arch"], len(split.class_names), in_ch, args["dropout"], args["pretrained"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda" and not args["freeze_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same keys; SyncBN needs CUDA

    common = dict(stream=stream, crop_size=args["crop_size"], flow_length=args["flow_length"])
    train_set = ClipDataset(store.root, train_part.video_ids, train_part.labels, train_counts,
                            train=True, segments=args["segments"], seed=seed, **common)
    try:
        sampler = EpochSampler(len(train_set), int(args["batch_size"]), seed, rank, world)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    per_rank = int(args["batch_size"]) // world
    loader = DevicePrefetcher(make_loader(train_set, sampler, per_rank, int(args["workers"]), device, seed), device)
    val_loader = None
    if val_part.video_ids:
        val_set = ClipDataset(store.root, val_part.video_ids, val_part.labels, val_counts,
                              train=False, segments=args["segments"], **common)
        val_loader = DevicePrefetcher(make_loader(val_set, ShardSampler(len(val_set), rank, world), per_rank,
                                                  int(args["workers"]), device, seed), device)

    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, len(loader))
    criterion = nn.CrossEntropyLoss()
    start_epoch, best_acc = 0, -1.0
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.jsonl"
    if args["resume"] and last_path.is_file():
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        if (ck["arch"], ck["in_channels"], ck["class_names"]) != (args["arch"], in_ch, split.class_names):
            raise ConfigError(f"{last_path} was trained as {ck['arch']} with {ck['in_channels']} input channels and "
                              f"{len(ck['class_names'])} classes; this run asks for {args['arch']}, {in_ch} and "
                              f"{len(split.class_names)}. Use another --out, or drop --resume to start over.")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, best_acc = ck["epoch"] + 1, ck["best_acc"]
        set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
        if rank == 0:
            print(f"{stream}: resuming from {last_path} after epoch {start_epoch}", file=sys.stderr)
    elif args["resume"] and rank == 0:
        print(f"{stream}: nothing to resume in {out_dir}; starting from scratch", file=sys.stderr)

    model_ddp = model
    if world > 1:
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)

    records = [r for r in read_log(log_path) if r["epoch"] <= start_epoch] if start_epoch else []
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_log(log_path, records)
        print(f"{stream}: {args['arch']} on {device} x{world}, {len(train_part)} train / {len(val_part)} val videos, "
              f"{len(split.class_names)} classes, {len(loader)} steps per epoch", file=sys.stderr)

    meta = {"arch": args["arch"], "stream": stream, "in_channels": in_ch, "num_classes": len(split.class_names),
            "class_names": list(split.class_names), "config": _plain(cfg), "stream_config": _plain(args)}
    for epoch in range(start_epoch, int(args["epochs"])):
        sampler.set_epoch(epoch)
        record = {"epoch": epoch + 1}
        record.update(train_one_epoch(model_ddp, criterion, optimizer, scheduler, loader, device, epoch, stream,
                                      args, show=rank == 0))
        if val_loader is not None:
            # The plain module: DDP could wait on buffer syncs across ranks' unequal eval shares.
            record.update(evaluate(model, criterion, val_loader, device, stream, args))
        score = record.get("val_acc", record["train_acc"])  # no val part: the latest epoch is the best
        improved = val_loader is None or score > best_acc
        best_acc = max(best_acc, score) if val_loader is not None else score
        states = all_rng_states(world)
        if rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "best_acc": best_acc,
                         "rng": states, **meta}, last_path)
            if improved:
                save_atomic({"model": model.state_dict(), "epoch": epoch, "val_acc": score, **meta}, best_path)
            records.append(record)
            write_log(log_path, records)
            print(f"{stream} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                  file=sys.stderr)
    if rank == 0:
        draw_curve(records, out_dir / "curve.png")
    if world > 1:
        dist.barrier()
    if joined:
        dist.destroy_process_group()
    return {"stream": stream, "out": str(out_dir), "best_acc": best_acc, "epochs": int(args["epochs"]),
            "log": records, "last": str(last_path), "best": str(best_path)}


def _plain(obj):
    """Config values as JSON-like primitives (safe for weights_only checkpoint loading)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
