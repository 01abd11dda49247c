"""Optical flow between two grayscale frames: one entry per algorithm in ALGORITHMS.

`make_flow(algo, preset)` returns `flow(prev_gray, next_gray) -> float32 HxWx2` (x, y displacement
in pixels, prev(y, x) ~ next(y + dy, x + dx)). `make_flow_batch` wraps it for lists of pairs: the
hook a GPU implementation plugs into (`device != "cpu"`), so the extraction loop does not change.

Algorithms (OpenCV contrib, one core each):
- tvl1       cv2.optflow.DualTVL1OpticalFlow (denseflow's and the paper's); presets accurate (OpenCV's
             defaults) and fast. Parameters use the snake_case names of flowprep/tvl1_torch.py, so one
             preset dict drives both the OpenCV and the torch implementation.
- farneback  cv2.calcOpticalFlowFarneback with OpenCV's sample settings.
- dis        cv2.DISOpticalFlow (Kroeger et al. 2016), presets ultrafast, fast, medium.
- deepflow   cv2.optflow.createOptFlow_DeepFlow (Weinzaepfel et al. 2013), OpenCV's defaults.
- lk         dense Lucas-Kanade: cv2.optflow.calcOpticalFlowSparseToDense, pyramidal LK matches on a
             grid interpolated by locally affine fits and a fast global smoother.
Adding one is an entry here: its presets (name -> recorded parameters) and a factory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

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
# Farneback: OpenCV's sample settings (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags).
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
_DIS_IDS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
            "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
_DIS_GETTERS = ("FinestScale", "PatchSize", "PatchStride", "GradientDescentIterations",
                "VariationalRefinementIterations", "VariationalRefinementAlpha", "VariationalRefinementDelta",
                "VariationalRefinementGamma", "UseMeanNormalization", "UseSpatialPropagation")


def _dis_params(name: str) -> dict:
    """What a DIS preset sets, read back from OpenCV (recorded with every stored video)."""
    d = cv2.DISOpticalFlow_create(_DIS_IDS[name])
    return {"preset_id": int(_DIS_IDS[name]), **{g: getattr(d, "get" + g)() for g in _DIS_GETTERS}}


LK = dict(grid_step=8, k=128, sigma=0.05, use_post_proc=True, fgs_lambda=500.0, fgs_sigma=1.5)

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
BatchFlowFn = Callable[[list, list], list]


@dataclass(frozen=True)
class Algorithm:
    name: str
    help: str
    presets: dict[str, dict]   # preset name -> the parameters it means (recorded in every stored video)
    default: str               # preset used when none is asked for
    make: Callable[[dict], FlowFn]  # parameters -> flow function

    @property
    def has_presets(self) -> bool:
        return len(self.presets) > 1


def _make_tvl1(p: dict) -> FlowFn:
    # OpenCV permanently lowers a TV-L1 object's nscales after a small image, so keep one per frame size.
    solvers: dict[tuple[int, int], object] = {}

    def tvl1(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        solver = solvers.get(prev.shape)
        if solver is None:
            solver = solvers[prev.shape] = opencv_tvl1(p)
        return solver.calc(prev, nxt, None)
    return tvl1


def _make_farneback(p: dict) -> FlowFn:
    def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(prev, nxt, None, p["pyr_scale"], p["levels"], p["winsize"],
                                            p["iterations"], p["poly_n"], p["poly_sigma"], p["flags"])
    return farneback


def _make_dis(p: dict) -> FlowFn:
    dis = cv2.DISOpticalFlow_create(p["preset_id"])
    return lambda prev, nxt: dis.calc(prev, nxt, None)


def _make_deepflow(p: dict) -> FlowFn:
    deep = cv2.optflow.createOptFlow_DeepFlow()
    return lambda prev, nxt: deep.calc(prev, nxt, None)


def _make_lk(p: dict) -> FlowFn:
    return lambda prev, nxt: cv2.optflow.calcOpticalFlowSparseToDense(
        prev, nxt, None, p["grid_step"], p["k"], p["sigma"], p["use_post_proc"], p["fgs_lambda"], p["fgs_sigma"])


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("tvl1", "OpenCV Dual TV-L1 (see --preset)", PRESETS, "accurate", _make_tvl1),
    Algorithm("farneback", "OpenCV Farneback (" + ", ".join(f"{k} {v}" for k, v in FARNEBACK.items()) + ")",
              {"default": FARNEBACK}, "default", _make_farneback),
    Algorithm("dis", "OpenCV DIS optical flow (presets ultrafast, fast, medium)",
              {n: _dis_params(n) for n in _DIS_IDS}, "medium", _make_dis),
    Algorithm("deepflow", "OpenCV contrib DeepFlow (cv2.optflow.createOptFlow_DeepFlow, its defaults)",
              {"default": {"function": "cv2.optflow.createOptFlow_DeepFlow"}}, "default", _make_deepflow),
    Algorithm("lk", "dense Lucas-Kanade: cv2.optflow.calcOpticalFlowSparseToDense ("
              + ", ".join(f"{k} {v}" for k, v in LK.items()) + ")", {"default": LK}, "default", _make_lk),
)}
ALGOS = tuple(ALGORITHMS)
PRESET_NAMES = tuple(dict.fromkeys(p for a in ALGORITHMS.values() for p in a.presets))

# Pairs per batched GPU solve: large enough to fill the GPU at 340x256, small enough for one video's
# worth of frames to stream through without holding the video in memory.
GPU_BATCH = 32


def resolve_preset(algo: str, preset: str | None = None) -> str:
    """The preset name `algo` uses for `preset` (None: its default); ValueError for a wrong pair."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown flow algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    a = ALGORITHMS[algo]
    if preset is None or (not a.has_presets and preset in (a.default, "accurate")):
        return a.default
    if preset not in a.presets:
        choices = ", ".join(a.presets) if a.has_presets else "none (leave --preset out)"
        raise ValueError(f"unknown {algo} preset {preset!r}; presets of {algo}: {choices}")
    return preset


def flow_params(algo: str, preset: str | None = None) -> dict:
    """The exact parameters `make_flow(algo, preset)` uses (recorded in every stored video)."""
    name = resolve_preset(algo, preset)  # first: it names a wrong algo or preset
    return dict(ALGORITHMS[algo].presets[name])


def opencv_tvl1(params: dict | None = None):
    """`cv2.optflow.DualTVL1OpticalFlow` from our parameter names (missing ones as `accurate`).

    Make one per frame size: OpenCV permanently lowers its nscales after a small image.
    """
    p = dict(ACCURATE, **(params or {}))
    # Positional: the Python binding misspells the inner-iterations keyword.
    return cv2.optflow.DualTVL1OpticalFlow_create(
        p["tau"], p["lambda_"], p["theta"], p["nscales"], p["warps"], p["epsilon"],
        p["inner_iterations"], p["outer_iterations"], p["scale_step"], 0.0, p["median_filtering"], False)


def make_flow(algo: str = "tvl1", preset: str | None = None) -> FlowFn:
    """A function computing flow from `prev` to `next` (HxW uint8 grayscale) -> float32 HxWx2."""
    return ALGORITHMS[algo].make(flow_params(algo, preset))


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


def make_flow_batch(algo: str = "tvl1", preset: str | None = None, device: str = "cpu") -> tuple[BatchFlowFn, int]:
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
