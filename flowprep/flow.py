"""Optical flow between two grayscale frames: OpenCV TV-L1 (as denseflow) or Farneback.

`make_flow(algo, preset)` returns `flow(prev_gray, next_gray) -> float32 HxWx2` (x, y displacement
in pixels, prev(y, x) ~ next(y + dy, x + dx)). `make_flow_batch` wraps it for lists of pairs: the
hook a GPU implementation plugs into (`device != "cpu"`), so the extraction loop does not change.

TV-L1 parameters use the snake_case names of flowprep/tvl1_torch.py, so one preset dict drives
both the OpenCV and the torch implementation.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

ALGOS = ("tvl1", "farneback")

ACCURATE = dict(
    tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01,
    inner_iterations=30, outer_iterations=10, scale_step=0.8, median_filtering=5,
)
PRESETS: dict[str, dict] = {
    # OpenCV's DualTVL1 defaults, the settings denseflow (and so most published two-stream numbers) use.
    "accurate": dict(ACCURATE),
    # A coarser pyramid (3 levels, halving) with 2 warps x 1 outer x 10 inner iterations: measured
    # about 8x faster than `accurate` on 340x256 footage, 0.05 px mean error on a known smooth motion
    # and about 0.4 px mean difference from `accurate` on real footage (benchmarks/extract_bench.py).
    "fast": dict(ACCURATE, nscales=3, scale_step=0.5, warps=2, inner_iterations=10, outer_iterations=1),
}
# Farneback has no presets: OpenCV's sample settings (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags).
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)

# Pairs per batched GPU solve: large enough to fill the GPU at 340x256, small enough for one video's
# worth of frames to stream through without holding the video in memory.
GPU_BATCH = 32

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
BatchFlowFn = Callable[[list, list], list]


def flow_params(algo: str, preset: str = "accurate") -> dict:
    """The exact parameters `make_flow(algo, preset)` uses (recorded in every stored video)."""
    if algo == "tvl1":
        if preset not in PRESETS:
            raise ValueError(f"unknown TV-L1 preset {preset!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[preset])
    if algo == "farneback":
        return dict(FARNEBACK)
    raise ValueError(f"unknown flow algorithm {algo!r}; choose one of {ALGOS}")


def opencv_tvl1(params: dict | None = None):
    """`cv2.optflow.DualTVL1OpticalFlow` from our parameter names (missing ones as `accurate`).

    Make one per frame size: OpenCV permanently lowers its nscales after a small image.
    """
    p = dict(ACCURATE, **(params or {}))
    # Positional: the Python binding misspells the inner-iterations keyword.
    return cv2.optflow.DualTVL1OpticalFlow_create(
        p["tau"], p["lambda_"], p["theta"], p["nscales"], p["warps"], p["epsilon"],
        p["inner_iterations"], p["outer_iterations"], p["scale_step"], 0.0, p["median_filtering"], False)


def make_flow(algo: str = "tvl1", preset: str = "accurate") -> FlowFn:
    """A function computing flow from `prev` to `next` (HxW uint8 grayscale) -> float32 HxWx2."""
    p = flow_params(algo, preset)
    if algo == "farneback":
        def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(prev, nxt, None, p["pyr_scale"], p["levels"], p["winsize"],
                                                p["iterations"], p["poly_n"], p["poly_sigma"], p["flags"])
        return farneback

    # OpenCV permanently lowers a TV-L1 object's nscales after a small image, so keep one per frame size.
    solvers: dict[tuple[int, int], object] = {}

    def tvl1(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        solver = solvers.get(prev.shape)
        if solver is None:
            solver = solvers[prev.shape] = opencv_tvl1(p)
        return solver.calc(prev, nxt, None)
    return tvl1


def check_device(algo: str, device: str) -> None:
    """Raise ValueError when `algo` cannot run on `device` here (no side effects, unlike building the solver)."""
    if device == "cpu":
        return
    if algo != "tvl1":
        raise ValueError(f"--device {device} supports --algo tvl1 only, got {algo!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")


def make_flow_batch(algo: str = "tvl1", preset: str = "accurate", device: str = "cpu") -> tuple[BatchFlowFn, int]:
    """(function(prevs, nexts) -> flows, preferred batch size) for lists of grayscale frame pairs.

    On CPU pairs go one by one through OpenCV (one core per worker; parallelism is across videos).
    On a GPU ('cuda', 'cuda:N') pairs are solved together by the batched torch TV-L1 (flowprep/tvl1_torch.py);
    'torch-cpu' runs that implementation on the CPU (slow; for checking it where there is no GPU).
    """
    check_device(algo, device)
    if device == "cpu":
        one = make_flow(algo, preset)
        return (lambda prevs, nexts: [one(a, b) for a, b in zip(prevs, nexts)]), 1
    import torch

    from flowprep.tvl1_torch import tvl1

    params = flow_params(algo, preset)
    # 'torch-cpu': the torch implementation on the CPU, to check it against OpenCV without a GPU.
    if device == "torch-cpu":
        device = "cpu"
        torch.set_num_threads(1)  # one core per worker, as the OpenCV path

    @torch.no_grad()
    def run(prevs: list, nexts: list) -> list:
        # One batched solve for all pairs; frames travel as uint8 (4x fewer bytes than float).
        a = torch.from_numpy(np.stack(prevs)).to(device, non_blocking=True)
        b = torch.from_numpy(np.stack(nexts)).to(device, non_blocking=True)
        return list(tvl1(a, b, **params).permute(0, 2, 3, 1).cpu().numpy())

    return run, GPU_BATCH


def set_single_thread() -> None:
    """One OpenCV thread per worker: parallelism comes from running one video per core, and a
    single thread also keeps results bit-identical from run to run."""
    cv2.setNumThreads(1)
