"""The training loop every trained model shares: a stream (trainer/train.py) and two streams with
a fusion trained end to end (trainer/joint.py). Flat, after torchvision's
references/video_classification: `train_one_epoch`, `evaluate`, and `fit`, which runs the epochs
with the run folder's checkpoints, resume, best epoch and log (trainer/checkpoint.py).

Resume continues exactly where a run was killed: last.pt holds the model, optimizer, scheduler,
every process's RNG state and the log, and the loaders draw every sample's randomness from
(seed, epoch, index) (trainer/data.py), so a resumed run makes the weights an uninterrupted one
makes, to the last bit.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from core.progress import Progress
from core.schema import ConfigError
from trainer import checkpoint as C
from trainer.models import freeze_bn
from trainer.utils import reduce_sum, world_size

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


def make_optimizer(params, c: dict) -> torch.optim.Optimizer:
    params = list(params)
    if c["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    return torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"])


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
                                f"lower the learning rate ({args['section']}.lr, now {args['lr']}), add warmup "
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


def fit(model: nn.Module, params, loaders: tuple, device: torch.device, args: dict, run_dir: Path, meta: dict,
        logits_fn: Callable[[nn.Module], Callable], identity: dict, *, rank: int = 0, world: int = 1,
        local: int = 0) -> dict:
    """Train `model` for args["epochs"] epochs into `run_dir`; returns a summary.

    loaders: (sampler, training loader, validation loader or None); params: what the optimizer
    trains; meta: what every checkpoint records besides the state (arch, classes, split, config);
    logits_fn(model) -> (x, y) -> class logits of a batch; identity: the meta keys a checkpoint
    to resume must match (else a sentence: another --out, or drop --resume).
    """
    sampler, loader, val_loader = loaders
    name = args["name"]
    criterion = nn.CrossEntropyLoss()   # a stream's logits, or the joint net's fused log-probabilities
    optimizer = make_optimizer(params, args)
    scheduler = make_scheduler(optimizer, args, len(loader))
    start_epoch, best_score, best_epoch, records = 0, None, None, []
    best_by = args["best_by"]
    resume = args["resume"]
    last_path = Path(resume) if isinstance(resume, str) else run_dir / C.LAST
    if rank == 0:
        C.start_run(run_dir)
    if resume and last_path.is_file():
        ck = C.load_checkpoint(last_path, "checkpoint to resume")
        theirs = {k: ck.get(k) for k in identity}
        if theirs != identity:
            raise ConfigError(f"{last_path} was trained as {_show(theirs)}; this run asks for {_show(identity)}. "
                              "Use another --out, or drop --resume to start over.")
        if ck.get("best_by", "val_acc") != best_by:
            raise ConfigError(f"{last_path} chose its best epoch by {ck.get('best_by', 'val_acc')}; this run asks for "
                              f"{args['section']}.best_by = {best_by}. Resume with the same setting, or drop --resume.")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start_epoch, best_epoch = C.epoch_of(ck), C.epoch_of(ck, "best_epoch")
        best_score = ck.get("best_score", ck["best_acc"])  # an older last.pt: chosen by accuracy
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
    for epoch in range(start_epoch, int(args["epochs"])):
        sampler.set_epoch(epoch)
        record = {"epoch": epoch + 1}
        record.update(train_one_epoch(model_ddp, criterion, optimizer, scheduler, loader, device, epoch, args,
                                      logits_fn(model_ddp), show=rank == 0))
        if val_loader is not None:
            # The plain module: DDP could wait on buffer syncs across ranks' unequal eval shares.
            record.update(evaluate(model, criterion, val_loader, device, logits_fn(model)))
        best_score, best_epoch = C.commit_epoch(
            run_dir, epoch, record, (best_score, best_epoch), val_loader is not None, records, world, rank,
            lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, meta, best_by)
        if rank == 0:
            log.info(f"{name} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                              if k != "epoch"))
    if world > 1:
        dist.barrier()
    best = C.record_of(records, best_epoch)
    return {"out": str(run_dir), "best_acc": best.get("val_acc"), "best_epoch": best_epoch, "best_by": best_by,
            "best_record": best, "has_val": val_loader is not None, "epochs": int(args["epochs"]), "log": records,
            "last": str(run_dir / C.LAST), "best": str(run_dir / C.BEST)}


def _show(identity: dict) -> str:
    """e.g. "arch resnet18, in_channels 3, class_names 4" (lists by their length)."""
    return ", ".join(f"{k} {len(v) if isinstance(v, list) else v}" for k, v in identity.items())


def plain(obj):
    """Config values as JSON-like primitives (safe for weights_only checkpoint loading)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
