"""Device and distributed helpers (as in torchvision's references/video_classification/utils.py)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from core.schema import ConfigError


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


def setup_device(device: torch.device, threads: int = 0, deterministic: bool = False) -> None:
    """Threads and algorithms. By default fast math where it does not cost accuracy that matters
    here (TF32 matmuls, cuDNN autotuning); `deterministic` trades that for run-to-run identity."""
    if threads:
        torch.set_num_threads(int(threads))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def setup_process(args: dict) -> tuple[int, int, int, torch.device, bool]:
    """A training process's start, from its settings (device, threads, deterministic, seed): join
    the process group torchrun describes (if any), set the device up, seed the RNGs (seed + rank).
    Returns (rank, world, local rank, device, joined: this call joined the group, so the caller
    leaves it at the end)."""
    joined = not dist.is_initialized()
    rank, world, local = init_distributed(args["device"])
    joined = joined and dist.is_initialized()
    device = pick_device(args["device"], local)
    setup_device(device, args["threads"], args["deterministic"])
    seed_everything(int(args["seed"]) + rank)
    return rank, world, local, device, joined


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def reduce_sum(values: list[float]) -> list[float]:
    """Sum over processes (a no-op in a single process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()
