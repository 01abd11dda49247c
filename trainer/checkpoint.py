"""A stream's run directory {out}/<stream>/, kept consistent whenever the job is killed.

    last.pt     every epoch: model, optimizer, scheduler, every process's RNG state, the epoch,
                the log records so far and the best epoch (`--resume` continues exactly from it)
    best.pt     the model of the best epoch: highest validation accuracy, or lowest validation
                loss with train.best_by = "val_loss" (ties: the earlier epoch); without a
                validation part, the last epoch
    log.jsonl   one record per epoch; curve.png the same, drawn

Each epoch writes, each file atomically: last.pt first (the commit point), then best.pt when
the epoch improved, then log.jsonl and curve.png. So a kill leaves at most best.pt or the log
one epoch behind last.pt, and never ahead of it; `repair` rewrites them from last.pt (which
holds the improving epoch's model itself, being that epoch's checkpoint). It runs on resume and
before best.pt is read for scoring, so a report never uses a best.pt older than the run says.
Checkpoints hold only tensors and primitives: they load with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist

from core.atomic import remove_temps, save_atomic, write_atomic
from core.schema import ConfigError

LAST, BEST, LOG, CURVE = "last.pt", "best.pt", "log.jsonl", "curve.png"
# Checkpoints count epochs from 1, as log.jsonl does ("epoch": 3 is the state after 3 epochs);
# version 1 (unmarked) counted from 0.
VERSION = 2


def epoch_of(ck: dict, key: str = "epoch") -> int | None:
    """A checkpoint's epoch (or best_epoch) counted from 1, as log.jsonl counts, whichever version wrote it."""
    v = ck.get(key)
    if v is None:
        return None
    return int(v) if ck.get("version", 1) >= VERSION else int(v) + 1


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


# ---------------------------------------------------------------- files

def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load with a sentence instead of a traceback for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no {what} at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle of other objects, not a file of ours
        raise ConfigError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is "
                          "truncated or not one of this trainer's checkpoints. Delete it to start over, or point "
                          "--resume at another checkpoint") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise ConfigError(f"{what} {path} is not one of this trainer's checkpoints (no 'model' entry)")
    return ck


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_log(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def start_run(run_dir: Path) -> None:
    """Create the run folder (with a sentence if --out is unusable) and drop leftovers of killed saves."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), run_dir)
        raise ConfigError(f"cannot make the run folder {run_dir}: {blocker} is a file; choose another --out") from None
    except PermissionError:
        raise ConfigError(f"cannot make the run folder {run_dir}: permission denied; choose another --out") from None
    remove_temps(run_dir, recursive=False)


def save_epoch(run_dir: Path, last: dict, best: dict | None) -> None:
    """Write one epoch's files in commit order (see the module docstring)."""
    save_atomic(run_dir / LAST, lambda p: torch.save(last, p))
    if best is not None:
        save_atomic(run_dir / BEST, lambda p: torch.save(best, p))
    write_log(run_dir / LOG, last["log"])
    draw_curve(last["log"], run_dir / CURVE)


BEST_BY = {"val_acc": "best validation accuracy", "val_loss": "lowest validation loss"}


def selection_score(record: dict, best_by: str = "val_acc") -> float:
    """How good an epoch is for choosing best.pt (higher is better): its validation accuracy, or
    minus its validation loss (best_by = "val_loss")."""
    return -record["val_loss"] if best_by == "val_loss" else record["val_acc"]


def record_of(records: list[dict], epoch: int | None) -> dict:
    """The log record of epoch number `epoch` (counted from 1); {} when the log lacks it (a run
    resumed without its log)."""
    return next((r for r in records if r["epoch"] == epoch), {})


def commit_epoch(run_dir: Path, epoch: int, record: dict, best: tuple[float | None, int | None], has_val: bool,
                 records: list[dict], world: int, rank: int, state, meta: dict,
                 best_by: str = "val_acc") -> tuple[float | None, int | None]:
    """End epoch number `epoch` (counted from 0 by the loop): the best so far by
    `selection_score` (ties keep the earlier epoch; without a validation part there is nothing to
    choose by: the latest epoch, score None), then on rank 0 the epoch's files through
    `save_epoch`. Every rank calls it (the RNG states are gathered); `state()` gives the
    model/optimizer/scheduler state dicts, asked for on rank 0 only. `best` and the result:
    (best score, best epoch counted from 1), (None, None) before the first epoch."""
    best_score, best_epoch = best
    done = epoch + 1  # epochs done, as log.jsonl counts them
    score = selection_score(record, best_by) if has_val else None
    improved = not has_val or best_score is None or score > best_score
    if improved:
        best_score, best_epoch = score, done
    states = all_rng_states(world)
    if rank == 0:
        records.append(record)
        best_record = record_of(records, best_epoch)
        chosen = BEST_BY[best_by] if has_val else "last epoch (no validation part: data.val_fraction = 0)"
        last = {**state(), "version": VERSION, "epoch": done, "best_acc": best_record.get("val_acc"),
                "best_score": best_score, "best_by": best_by, "best_epoch": best_epoch, "chosen_by": chosen,
                "log": records, "rng": states, **meta}
        save_epoch(run_dir, last, best_from_last(last) if improved else None)
    return best_score, best_epoch


def best_from_last(last: dict) -> dict:
    """best.pt's contents for an epoch that improved, from that epoch's last.pt."""
    drop = ("optimizer", "scheduler", "rng", "log", "best_acc", "best_score", "best_by", "best_epoch")
    return {**{k: v for k, v in last.items() if k not in drop}, "val_acc": last["best_acc"]}


def repair(run_dir: Path, last: dict | None = None) -> None:
    """Bring best.pt and log.jsonl up to date with last.pt after a kill between their writes."""
    if last is None:
        if not (run_dir / LAST).is_file():
            return
        last = load_checkpoint(run_dir / LAST, "checkpoint")
    if "log" not in last:
        return  # written by an older version: nothing to compare with
    if read_log(run_dir / LOG) != last["log"]:
        write_log(run_dir / LOG, last["log"])
        draw_curve(last["log"], run_dir / CURVE)
    best_path = run_dir / BEST
    best_epoch = epoch_of(last, "best_epoch")
    if best_epoch is not None and best_epoch == epoch_of(last):
        current = torch.load(best_path, map_location="cpu", weights_only=True) if best_path.is_file() else None
        if current is None or epoch_of(current) != best_epoch:
            save_atomic(best_path, lambda p: torch.save(best_from_last(last), p))


def load_best(out: str | Path, stream: str) -> dict:
    run_dir = Path(out) / stream
    if not (run_dir / BEST).is_file() and not (run_dir / LAST).is_file():
        raise ConfigError(f"no trained {stream} model at {run_dir / BEST}; run "
                          f"`python -m twostream train --stream {stream}` first")
    repair(run_dir)
    return load_checkpoint(run_dir / BEST, f"the {stream} stream's best model")


# ---------------------------------------------------------------- curve.png

def draw_curve(records: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Loss (left axis) and accuracies (right axis, 0..1) per epoch, drawn with OpenCV."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, w - 60, 30, h - 40
    cv2.rectangle(img, (left, top), (right, bottom), (0, 0, 0), 1)
    epochs = [r["epoch"] for r in records]
    font = cv2.FONT_HERSHEY_SIMPLEX
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
            cv2.putText(img, key, (left + 10 + 130 * k, top - 10), font, 0.45, color, 1, cv2.LINE_AA)
        cv2.putText(img, f"{lmax:.2f}", (5, top + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "1.0", (right + 5, top + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"epoch {e0}", (left, bottom + 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"epoch {e1}", (right - 60, bottom + 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    write_atomic(path, buf.tobytes())
