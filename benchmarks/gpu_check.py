"""The GPU figures of docs/performance.md in one run, on a fresh GPU machine (benchmarks/gpu_check.sh).

What such a machine has: torch, torchvision, numba, h5py, click, joblib and opencv-python-headless
(main modules: no cv2.optflow, so OpenCV's TV-L1 is not there to compare with; no scikit-video,
so the frames are a synthetic texture moving by a known, varied amount). Nothing is downloaded.

    bash benchmarks/gpu_check.sh              # the GPU tables, under 8 minutes on an H100-class GPU
    bash benchmarks/gpu_check.sh --dry-run    # the same code at tiny sizes on the CPU (make test runs it)

Tables (Markdown):
1. the machine: GPU, torch, CUDA, CPU cores;
2. torch TV-L1 at 340x256 (`flowprep/tvl1_torch.py`), presets fast and accurate: pairs/s in fixed
   batches of 1, 8 and 32 pairs, and with continuous batching (`ContinuousTVL1`, pairs of mixed
   motion entering as others finish), peak GPU memory per pair;
3. training at the model's own pace: samples/s of resnet18 / resnet50, spatial (3 channels) and
   temporal (L=10: 20 channels) at 224x224, bf16 autocast, channels_last, batches already on the GPU;
4. (not with --dry-run) the input pipeline: benchmarks/train_bench.py with the real loaders
   from JPEG and raw-HDF5 stores, as its own table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowprep.presets import TVL1_PRESETS  # noqa: E402
from flowprep.tvl1_continuous import ContinuousTVL1  # noqa: E402
from flowprep.tvl1_torch import tvl1  # noqa: E402


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random texture, uint8 (flow needs something to track everywhere)."""
    import cv2

    img = np.zeros((h, w), np.float32)
    for s in (2, 4, 8, 16):
        img += cv2.resize(rng.random((h // s + 2, w // s + 2)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def pairs(n: int, h: int, w: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n frame pairs, each a texture and its shift by 0.5-6 px (low to high motion)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = texture(rng, h, w)
        dx, dy = rng.uniform(0.5, 6.0) * rng.choice([-1, 1]), rng.uniform(-2, 2)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        out.append((a, cv2.warpAffine(a, m, (w, h), borderMode=cv2.BORDER_REFLECT)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU dry run)"
    rows = [["GPU", gpu], ["torch", torch.__version__], ["CUDA", torch.version.cuda or "-"],
            ["CPU cores", os.cpu_count()]]
    return table(["", ""], rows)


def flow_section(device: torch.device, size: tuple[int, int], n: int, batches: list[int], presets: list[str]) -> str:
    w, h = size
    data = pairs(n, h, w)
    a = torch.from_numpy(np.stack([p[0] for p in data])).to(device)
    b = torch.from_numpy(np.stack([p[1] for p in data])).to(device)
    rows = []
    for preset in presets:
        params = TVL1_PRESETS[preset]
        tvl1(a[:1], b[:1], **params)  # warm up (kernels, torch.compile)
        for batch in batches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m = n if batch > 1 else max(1, n // 8)  # one pair at a time is slow: fewer pairs
            sync(device)
            t = time.perf_counter()
            for i in range(0, m, batch):
                tvl1(a[i:i + batch], b[i:i + batch], **params)
            sync(device)
            dt = time.perf_counter() - t
            mem = torch.cuda.max_memory_allocated(device) / batch / 2**20 if device.type == "cuda" else float("nan")
            rows.append([preset, f"fixed batches of {batch} ({m} pairs)", f"{m / dt:.1f}", f"{mem:.0f}"])
        solver = ContinuousTVL1(batches[-1], device, **params)
        sync(device)
        t = time.perf_counter()
        futures = [solver.submit(x, y) for x, y in zip(a, b)]
        solver.run()
        [f.result() for f in futures]
        sync(device)
        rows.append([preset, f"continuous, up to {batches[-1]} a launch", f"{n / (time.perf_counter() - t):.1f}", "-"])
    return table([f"preset ({w}x{h}, {n} pairs)", "how", "pairs/s", "peak MiB per pair"], rows)


def train_section(device: torch.device, archs: list[str], batch: int, size: int, steps: int) -> str:
    from trainer.models import build_model

    rows = []
    for arch in archs:
        for stream, ch in (("spatial", 3), ("temporal", 20)):
            model = build_model(arch, 101, ch).to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(batch, ch, size, size, device=device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 101, (batch,), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for _ in range(2):
                step()
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rows.append([arch, stream, ch, batch, f"{steps * batch / (time.perf_counter() - t):.0f}"])
    return table(["arch", "stream", "channels", "batch", "samples/s (model's pace)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; use --dry-run to check the script on the CPU")
    t0 = time.perf_counter()
    print("## Machine\n\n" + machine(device) + "\n")
    if args.dry_run:
        flow = flow_section(device, (40, 32), 2, [1, 2], ["fast"])
        train = train_section(device, ["resnet18"], 2, 32, 1)
    else:
        flow = flow_section(device, (340, 256), 64, [1, 8, 32], ["fast", "accurate"])
        train = train_section(device, ["resnet18", "resnet50"], 64, 224, 20)
    print("## TV-L1 on the GPU (torch port)\n\n" + flow + "\n")
    print("## Training at the model's pace\n\n" + train + "\n")
    if not args.dry_run:
        print("## Training fed by the real loaders (benchmarks/train_bench.py)\n", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--device", "cuda", "--workers",
                        str(min(16, os.cpu_count() or 1)), "--steps", "30"], check=False)
    print(f"\ngpu_check: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
