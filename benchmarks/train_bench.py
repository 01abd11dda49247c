"""Is the input pipeline fast enough? Training samples/s per stream and backbone, fed

  (a) synthetic uint8 batches already on the device (the model's own pace), and
  (b) the real loader from a JPEG store and from an HDF5 store (built here from synthetic frames),

in the same run; ratio = (b) / (a). 1.0 means the GPU, not the input, sets the pace (target
>= 0.9 for resnet50 on an H100). The per-sample CPU cost of each loader stage is
benchmarks/loader_bench.py's.

    python benchmarks/train_bench.py --quick            # CPU, tiny sizes, about 2 minutes
    python benchmarks/train_bench.py --device cuda --workers 16
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import cv2
import numpy as np
import torch
from torch import nn

from flowprep.quant import quantize
from flowprep.store import open_writer
from flowprep.store_files import write_store_info
from trainer.data import ClipDataset, DevicePrefetcher, EpochSampler, make_loader
from trainer.models import build_model
from trainer.streams import DEFAULT_STREAMS, INPUTS
from trainer.forward import forward
from trainer.utils import pick_device


def smooth_noise(rng: np.random.Generator, h: int, w: int, c: int, scale: int = 8) -> np.ndarray:
    """Blurry random texture: JPEG sizes and decode costs like real frames, unlike white noise."""
    small = rng.random((max(h // scale, 2), max(w // scale, 2), c)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)


def build_store(root: Path, fmt: str, videos: int, frames: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    w, h = size
    write_store_info(root, {"format": fmt, "bound": 20.0})
    rng = np.random.default_rng(seed)
    ids = []
    for v in range(videos):
        vid = f"c{v % 4}/v{v:04d}"
        base = (smooth_noise(rng, h, w, 3) * 255).astype(np.uint8)
        with open_writer(fmt, root, vid) as wr:
            for t in range(frames):
                wr.write_rgb(np.roll(base, 2 * t, axis=1))
            for t in range(frames - 1):
                wr.write_flow(quantize((smooth_noise(rng, h, w, 2) - 0.5) * 8, 20.0))
            wr.commit({})
        ids.append(vid)
    return ids


def time_steps(model, criterion, optimizer, batches, device, stream, steps: int, warmup: int,
               flow_length: int = 10) -> float:
    """Samples/s over `steps` training steps after `warmup` ones (includes waiting for batches)."""
    model.train()
    it = iter(batches)
    seen = 0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        y = y.to(device, non_blocking=True)
        args = {"flow_length": flow_length, "mean_subtraction": stream == "temporal", "amp": True}
        loss = criterion(forward(model, x, device, INPUTS[DEFAULT_STREAMS[stream]], args), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def repeat(x, y):
    while True:
        yield x, y


@click.command()
@click.option("--quick", is_flag=True, help="CPU, tiny frames and crops, few steps (about 2 minutes on 2 cores).")
@click.option("--device", default=None, help="auto (default), cpu, cuda.")
@click.option("--steps", type=int, default=None, help="Timed steps per measurement (after warmup).")
@click.option("--archs", default="resnet18,resnet50", show_default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--workers", type=int, default=None, help="Loader workers (default: 16 on GPU, half the cores on CPU).")
@click.option("--flow-length", type=int, default=10, show_default=True)
def main(quick, device, steps, archs, batch_size, workers, flow_length):
    if quick:
        device = device or "cpu"
        size, crop, batch, videos, frames = (128, 96), 64, batch_size or 8, 16, flow_length + 4
        steps, warmup = steps or 5, 2
    else:
        size, crop, batch, videos, frames = (340, 256), 224, batch_size or 128, 64, 40
        steps, warmup = steps or 30, 10
    dev = pick_device(device or "auto")
    cores = os.cpu_count() or 1
    if workers is None:
        workers = max(1, cores // 2) if dev.type == "cpu" else min(16, cores)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:  # loader workers and the model share the cores; oversubscribed OpenMP threads spin-wait badly
        torch.set_num_threads(max(1, cores - workers))
    print(f"device {dev}, crop {crop}, batch {batch}, {steps} steps (+{warmup} warmup), {workers} workers, "
          f"{torch.get_num_threads()} compute threads, "
          f"frames {size[0]}x{size[1]}, L={flow_length}")
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        stores = {}
        for fmt in ("jpeg", "hdf5"):
            t0 = time.perf_counter()
            root = Path(tmp) / fmt
            ids = build_store(root, fmt, videos, frames, size)
            stores[fmt] = (root, ids)
            print(f"built {fmt} store: {videos} videos x {frames} frames in {time.perf_counter() - t0:.1f} s")

        print(f"\n{'stream':9s}{'arch':10s}{'synthetic/s':>12s}{'jpeg/s':>10s}{'ratio':>7s}{'hdf5/s':>10s}{'ratio':>7s}")
        for arch in archs.split(","):
            for stream in ("spatial", "temporal"):
                channels = 3 if stream == "spatial" else 2 * flow_length
                torch.manual_seed(0)
                model = build_model(arch, 4, channels).to(dev)
                if dev.type == "cuda":
                    model = model.to(memory_format=torch.channels_last)
                criterion = nn.CrossEntropyLoss()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                x = torch.randint(0, 256, (batch, 1, channels, crop, crop), dtype=torch.uint8, device=dev)
                y = torch.randint(0, 4, (batch,), device=dev)
                synthetic = time_steps(model, criterion, optimizer, repeat(x, y), dev, stream, steps, warmup,
                                       flow_length)
                row = f"{stream:9s}{arch:10s}{synthetic:12.1f}"
                for fmt, (root, ids) in stores.items():
                    counts = [(frames, frames - 1)] * len(ids)
                    # The videos 64 times over: enough keys for the run from one epoch's sampler.
                    ds = ClipDataset(root, ids * 64, [i % 4 for i in range(len(ids))] * 64, counts * 64,
                                     kind=INPUTS[DEFAULT_STREAMS[stream]], crop_size=crop, flow_length=flow_length, train=True)
                    loader = make_loader(ds, EpochSampler(len(ds.video_ids), batch), batch, workers, dev)
                    real = time_steps(model, criterion, optimizer, DevicePrefetcher(loader, dev), dev, stream,
                                      steps, warmup, flow_length)
                    del loader
                    row += f"{real:10.1f}{real / synthetic:7.2f}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
