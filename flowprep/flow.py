"""Optical flow between two grayscale frames: one entry per algorithm in ALGORITHMS.

A job resolves what it computes once, into a `FlowSpec` (algorithm, preset, the parameters it
means, device): that is what every stored video records, and what each worker turns into a
function with `make_flow_batch(spec)`, the one place CPU and GPU flow plug in:
`(prevs, nexts) -> flows`, float32 HxWx2 (x, y displacement in pixels, prev(y, x) ~
next(y + dy, x + dx)), for lists of pairs, so the extraction loop does not change.

Algorithms (OpenCV contrib, one core each):
- tvl1       cv2.optflow.DualTVL1OpticalFlow (denseflow's and the paper's); presets accurate (OpenCV's
             defaults) and fast (flowprep/presets.py). On the CPU two engines compute it, bit for bit
             the same flow: `fused` (flowprep/tvl1_fused.py, several times faster; the default) and
             `opencv` (OpenCV's own). On a GPU, the batched torch port (tvl1_torch.py).
- farneback  cv2.calcOpticalFlowFarneback with OpenCV's sample settings.
- dis        cv2.DISOpticalFlow (Kroeger et al. 2016), presets ultrafast, fast, medium.
- deepflow   cv2.optflow.createOptFlow_DeepFlow (Weinzaepfel et al. 2013), OpenCV's defaults.
- lk         dense Lucas-Kanade: cv2.optflow.calcOpticalFlowSparseToDense, pyramidal LK matches on a
             grid interpolated by locally affine fits and a fast global smoother.
Adding one is an entry here: its preset names, what each means (recorded parameters) and a factory.
Importing this module creates no OpenCV object (DIS presets are read from OpenCV when used).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from flowprep.presets import DIS_PRESETS, FARNEBACK, LK, TVL1_PRESETS

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
BatchFlowFn = Callable[[list, list], list]

# Pairs per batched GPU solve: large enough to fill the GPU at 340x256, small enough for one video's
# worth of frames to stream through without holding the video in memory.
GPU_BATCH = 32
DEVICE_HELP = "cpu | cuda | cuda:N | torch-cpu"
# TV-L1 on the CPU: the fused engine (OpenCV's flow bit for bit, several times faster) or OpenCV's own.
ENGINES = ("fused", "opencv")


@dataclass(frozen=True)
class Algorithm:
    name: str
    help: str
    preset_names: tuple[str, ...]    # its presets ("default" when it has none)
    default: str                     # the preset used when none is asked for
    params: Callable[[str], dict]    # preset name -> the parameters it means (recorded with every video)
    make: Callable[[dict], FlowFn]   # parameters -> flow function

    @property
    def has_presets(self) -> bool:
        return len(self.preset_names) > 1


def opencv_tvl1(params: dict | None = None):
    """`cv2.optflow.DualTVL1OpticalFlow` from our parameter names (missing ones as `accurate`).

    Make one per frame size: OpenCV permanently lowers its nscales after a small image.
    """
    p = dict(TVL1_PRESETS["accurate"], **(params or {}))
    # Positional: the Python binding misspells the inner-iterations keyword.
    return cv2.optflow.DualTVL1OpticalFlow_create(
        p["tau"], p["lambda_"], p["theta"], p["nscales"], p["warps"], p["epsilon"],
        p["inner_iterations"], p["outer_iterations"], p["scale_step"], 0.0, p["median_filtering"], False)


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


_DIS_GETTERS = ("FinestScale", "PatchSize", "PatchStride", "GradientDescentIterations",
                "VariationalRefinementIterations", "VariationalRefinementAlpha", "VariationalRefinementDelta",
                "VariationalRefinementGamma", "UseMeanNormalization", "UseSpatialPropagation")


def _dis_id(name: str) -> int:
    return int(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{name.upper()}"))


@functools.cache
def _dis_params(name: str) -> dict:
    """What a DIS preset sets, read back from OpenCV (recorded with every stored video)."""
    d = cv2.DISOpticalFlow_create(_dis_id(name))
    return {"preset_id": _dis_id(name), **{g: getattr(d, "get" + g)() for g in _DIS_GETTERS}}


def _make_dis(p: dict) -> FlowFn:
    dis = cv2.DISOpticalFlow_create(p["preset_id"])
    return lambda prev, nxt: dis.calc(prev, nxt, None)


def _make_deepflow(p: dict) -> FlowFn:
    deep = cv2.optflow.createOptFlow_DeepFlow()
    return lambda prev, nxt: deep.calc(prev, nxt, None)


def _make_lk(p: dict) -> FlowFn:
    return lambda prev, nxt: cv2.optflow.calcOpticalFlowSparseToDense(
        prev, nxt, None, p["grid_step"], p["k"], p["sigma"], p["use_post_proc"], p["fgs_lambda"], p["fgs_sigma"])


def _one(params: dict) -> Callable[[str], dict]:
    return lambda name: dict(params)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("tvl1", "OpenCV Dual TV-L1 (see --preset)", tuple(TVL1_PRESETS), "accurate",
              lambda n: dict(TVL1_PRESETS[n]), _make_tvl1),
    Algorithm("farneback", "OpenCV Farneback (" + ", ".join(f"{k} {v}" for k, v in FARNEBACK.items()) + ")",
              ("default",), "default", _one(FARNEBACK), _make_farneback),
    Algorithm("dis", "OpenCV DIS optical flow (presets ultrafast, fast, medium)", DIS_PRESETS, "medium", _dis_params,
              _make_dis),
    Algorithm("deepflow", "OpenCV contrib DeepFlow (cv2.optflow.createOptFlow_DeepFlow, its defaults)",
              ("default",), "default", _one({"function": "cv2.optflow.createOptFlow_DeepFlow"}), _make_deepflow),
    Algorithm("lk", "dense Lucas-Kanade: cv2.optflow.calcOpticalFlowSparseToDense ("
              + ", ".join(f"{k} {v}" for k, v in LK.items()) + ")", ("default",), "default", _one(LK), _make_lk),
)}
ALGOS = tuple(ALGORITHMS)
PRESET_NAMES = tuple(dict.fromkeys(p for a in ALGORITHMS.values() for p in a.preset_names))


def resolve_preset(algo: str, preset: str | None = None) -> str:
    """The preset name `algo` uses for `preset` (None: its default); ValueError for a wrong pair."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown flow algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    a = ALGORITHMS[algo]
    if preset is None or (not a.has_presets and preset in (a.default, "accurate")):
        return a.default
    if preset not in a.preset_names:
        choices = ", ".join(a.preset_names) if a.has_presets else "none (leave --preset out)"
        raise ValueError(f"unknown {algo} preset {preset!r}; presets of {algo}: {choices}")
    return preset


def flow_params(algo: str, preset: str | None = None) -> dict:
    """The exact parameters `algo` with `preset` computes with (recorded in every stored video)."""
    name = resolve_preset(algo, preset)  # first: it names a wrong algo or preset
    return dict(ALGORITHMS[algo].params(name))


def check_device(algo: str, device: str) -> None:
    """Raise ValueError when `algo` cannot run on `device` here (no side effects, unlike building the solver)."""
    if device == "cpu":
        return
    if device != "torch-cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use {DEVICE_HELP}")
    if algo != "tvl1":
        raise ValueError(f"--device {device} supports --algo tvl1 only, got {algo!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")


@dataclass(frozen=True)
class FlowSpec:
    """A flow computation resolved once per job: algorithm, preset (None for algorithms without
    presets), the parameters they mean, the device and engine that compute it, and how many
    threads one task's flow may use (not part of what is computed). Picklable: it travels to the
    workers, which build their function from it (`make_flow_batch`)."""

    algo: str
    preset: str | None
    params: dict = field(compare=True, hash=False)
    device: str = "cpu"
    engine: str = "opencv"  # "fused" (TV-L1 on the CPU), "opencv", or "torch" (off the CPU)
    threads: int = field(default=1, compare=False)

    @property
    def implementation(self) -> str:
        """Whose flow it is: OpenCV's (either CPU engine: the same bits), or the torch port's
        (close to OpenCV's, not bit for bit)."""
        return "opencv" if self.device == "cpu" else "torch"


def flow_spec(algo: str = "tvl1", preset: str | None = None, device: str = "cpu", engine: str = "fused") -> FlowSpec:
    """Resolve (algo, preset, device, engine) once; ValueError naming a wrong algorithm, preset or
    engine. The engine is what runs TV-L1 on the CPU; other algorithms and devices have one each."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    name = resolve_preset(algo, preset)
    engine = "torch" if device != "cpu" else engine if algo == "tvl1" else "opencv"
    return FlowSpec(algo, name if ALGORITHMS[algo].has_presets else None, flow_params(algo, name), device, engine)


def make_flow(algo: str = "tvl1", preset: str | None = None) -> FlowFn:
    """A function computing flow from `prev` to `next` (HxW uint8 grayscale) -> float32 HxWx2, on the CPU."""
    return ALGORITHMS[algo].make(flow_params(algo, preset))


class FusedOrOpenCV:
    """TV-L1 on the CPU by the fused engine, frame size by frame size: where it cannot give
    OpenCV's flow bit for bit (`tvl1_fused.unsupported`: another machine, OpenCV build, a frame
    too small), OpenCV's own computes it and `fallbacks` says why, for the manifest."""

    def __init__(self, params: dict, threads: int = 1):
        self.params, self.threads = params, threads
        self.by_size: dict[tuple[int, int], FlowFn] = {}
        self.fallbacks: dict[tuple[int, int], str] = {}

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        fn = self.by_size.get(prev.shape)
        if fn is None:
            from flowprep import tvl1_fused

            why = tvl1_fused.unsupported(self.params, prev.shape)
            if why is None:
                fn = tvl1_fused.FusedTVL1(self.params, threads=self.threads).calc
            else:
                self.fallbacks[prev.shape] = why
                fn = _make_tvl1(self.params)
            self.by_size[prev.shape] = fn
        return fn(prev, nxt)

    def engine_used(self) -> str:
        """What computed the flow so far: "fused", or OpenCV and why."""
        if not self.fallbacks:
            return "fused"
        return "opencv (fused engine not bit-identical here: " + "; ".join(sorted(set(self.fallbacks.values()))) + ")"


def make_flow_batch(spec: FlowSpec) -> tuple[BatchFlowFn, int]:
    """(function(prevs, nexts) -> flows, preferred batch size) for lists of grayscale frame pairs.

    On CPU pairs go one by one (one core per worker; parallelism is across videos), through the
    fused TV-L1 engine or OpenCV. The function's `engine_used()` says which computed them. On a
    GPU ('cuda', 'cuda:N') pairs are solved together by the batched torch TV-L1
    (flowprep/tvl1_torch.py); 'torch-cpu' runs that implementation on the CPU (slow; for checking
    it where there is no GPU).
    """
    check_device(spec.algo, spec.device)
    if spec.device == "cpu":
        one = FusedOrOpenCV(spec.params, spec.threads) if spec.engine == "fused" else \
            ALGORITHMS[spec.algo].make(spec.params)

        def run(prevs: list, nexts: list) -> list:
            return [one(a, b) for a, b in zip(prevs, nexts)]
        run.engine_used = one.engine_used if spec.engine == "fused" else (lambda: spec.engine)
        return run, 1
    import torch

    from flowprep.tvl1_torch import tvl1

    device = spec.device
    if device == "torch-cpu":  # the torch implementation on the CPU, to check it against OpenCV without a GPU
        device = "cpu"
        torch.set_num_threads(1)  # one core per worker, as the OpenCV path

    @torch.no_grad()
    def run(prevs: list, nexts: list) -> list:
        # One batched solve for all pairs; frames travel as uint8 (4x fewer bytes than float).
        a = torch.from_numpy(np.stack(prevs)).to(device, non_blocking=True)
        b = torch.from_numpy(np.stack(nexts)).to(device, non_blocking=True)
        return list(tvl1(a, b, **spec.params).permute(0, 2, 3, 1).cpu().numpy())

    run.engine_used = lambda: "torch"
    return run, GPU_BATCH


def set_single_thread() -> None:
    """One OpenCV thread per worker: parallelism comes from running one video per core, and a
    single thread also keeps results bit-identical from run to run."""
    cv2.setNumThreads(1)
