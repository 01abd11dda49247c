"""Tiny synthetic stores and splits for the trainer tests (written directly, no extraction).

The toy task is motion-only: in every video a textured square moves up (class "up") or down
(class "down") over a textured background. Start positions are drawn so that any single
frame has the same distribution in both classes: only the flow tells them apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flowprep.quant import quantize
from flowprep.store import open_writer
from flowprep.store_files import write_store_info
from twostream.pipeline import validate

CLASSES = ("down", "up")


def toy_video(rng: np.random.Generator, up: bool, frames: int, size=(40, 48), square=14, speed=3, tint=False,
              backward: list | None = None):
    """(frames BGR list, quantized flows list) of one video; `tint` adds an appearance cue (bright "up" videos).
    `backward`: a list that receives the backward flows (frame t+1 to frame t)."""
    h, w = size
    background = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if tint:
        background = (background // 2 + (128 if up else 0)).astype(np.uint8)
    patch = rng.integers(0, 256, (square, square, 3), dtype=np.uint8)
    travel = speed * (frames - 1)
    lo, hi = 0, h - square
    y0 = rng.integers(lo + travel, hi + 1) if up else rng.integers(lo, hi - travel + 1)
    x = int(rng.integers(0, w - square + 1))
    dy = -speed if up else speed
    imgs, flows = [], []
    for t in range(frames):
        img = background.copy()
        y = int(y0 + dy * t)
        img[y:y + square, x:x + square] = patch
        imgs.append(img)
        if t < frames - 1:
            f = np.zeros((h, w, 2), np.float32)
            f[y:y + square, x:x + square, 1] = dy
            flows.append(quantize(f, 20.0))
            if backward is not None:  # the square, at its next position, moves back
                b = np.zeros((h, w, 2), np.float32)
                b[y + dy:y + dy + square, x:x + square, 1] = -dy
                backward.append(quantize(b, 20.0))
    return imgs, flows


def make_toy(root: Path, fmt: str = "jpeg", train_per_class: int = 16, test_per_class: int = 8, frames: int = 8,
             seed: int = 0, classes: tuple[str, str] = CLASSES, backward: bool = False, **kw) -> tuple[Path, Path]:
    """Write a store and a `list` split (train.txt / test.txt) under root; returns (store, splits).
    `classes`: the names of the (down, up) classes; `backward`: store backward flows too."""
    store, splits = root / "store", root / "splits"
    write_store_info(store, {"format": fmt, "bound": 20.0})
    splits.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = {"train": [], "test": []}
    for part, n in (("train", train_per_class), ("test", test_per_class)):
        for label, cls in enumerate(classes):
            for i in range(n):
                vid = f"{cls}/v_{cls}_{part}{i:03d}"
                bflows = [] if backward else None
                imgs, flows = toy_video(rng, label == 1, frames, backward=bflows, **kw)
                with open_writer(fmt, store, vid) as w:
                    for im in imgs:
                        w.write_rgb(im)
                    for q in flows:
                        w.write_flow(q)
                    for q in bflows or []:
                        w.write_flow(q, backward=True)
                    w.commit({"source": vid + ".avi"})
                lines[part].append(f"{vid}.avi {label}\n")
    for part, ls in lines.items():
        (splits / f"{part}.txt").write_text("".join(ls))
    return store, splits


def toy_config(root: Path, store: Path, splits: Path, **train) -> dict:
    """A validated pipeline for tiny CPU runs; `train` keys override [train]. A test that changes
    it validates the changed dict again (`validate`), as a command line would."""
    return validate(toy_raw(root, store, splits, **train))


def toy_raw(root: Path, store: Path, splits: Path, **train) -> dict:
    """What toy_config validates: the pipeline as a file would hold it."""
    return {
        "name": "toy", "out": str(root / "run"),
        "data": {"store": str(store), "split_format": "list", "splits": str(splits), "split": 1,
                 "val_fraction": 0.2},
        "train": {"arch": "resnet18", "epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "sgd",
                  "schedule": "constant", "workers": 0, "device": "cpu", "seed": 0, "crop_size": 32,
                  "dropout": 0.0, "print_freq": 5, **train},
        "temporal": {"flow_length": 3, "mean_subtraction": True},
        "eval": {"segments": 5, "crops": "center", "batch_size": 16},
    }


def write_pipeline(path: Path, cfg: dict) -> Path:
    """Write a pipeline dict as TOML (JSON scalars and arrays are valid TOML)."""
    import json

    top = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    sections = [f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
                for k, v in cfg.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n")
    return path


def ddp_worker(rank: int, world: int, port: int, cfg: dict, stream: str) -> None:
    """One torchrun-like process for the multi-process test (spawned, so module level)."""
    import os

    import torch

    from trainer.train import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(cfg, stream)


def kill_in_second_epoch(monkeypatch, run) -> None:
    """Run `run()` as a job killed two steps into its second epoch: it stops there
    (KeyboardInterrupt) with its first epoch committed. Then reseed torch, as the fresh process
    that resumes it would not share our RNG state either."""
    import pytest
    import torch

    import trainer.fit as fit_mod

    real = fit_mod.train_one_epoch
    monkeypatch.setattr(fit_mod, "train_one_epoch", _killed_in_second_epoch(real))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(fit_mod, "train_one_epoch", real)
    torch.manual_seed(123)


def log_without_speed(path) -> list[dict]:
    """A run's log.jsonl without samples_per_s (the one field that differs between equal runs)."""
    import json

    return [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"}
            for x in Path(path).read_text().splitlines()]


def _killed_in_second_epoch(real):
    """trainer.fit.train_one_epoch as a job killed two steps into its second epoch would run it."""
    import itertools

    class FirstSteps:
        def __init__(self, loader, n):
            self.loader, self.n = loader, n

        def __len__(self):
            return self.n

        def __iter__(self):
            return itertools.islice(iter(self.loader), self.n)

    def train_one_epoch(model, criterion, optimizer, scheduler, loader, *a, **kw):
        if a[1] == 1:  # epoch index 1: two steps, then the job dies
            real(model, criterion, optimizer, scheduler, FirstSteps(loader, 2), *a, **kw)
            raise KeyboardInterrupt
        return real(model, criterion, optimizer, scheduler, loader, *a, **kw)
    return train_one_epoch
