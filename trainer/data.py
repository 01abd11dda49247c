"""Datasets and loaders over a flowprep store, for any stream input (trainer/streams.py).

A sample is a uint8 tensor [K, C, S, S]: K segments (TSN; K = 1 is the paper's single
frame or stack) or test crops, C the channels the stream's input loads (3 for RGB, 2L for a
flow stack), S the crop size. Workers read (only the training crop's region, where the store
can), decode and resize on planar uint8, and the batch is pinned as uint8 (a quarter of the
bytes of float32); the device flips, converts and normalises (`transforms.flip_batch`,
`Input.to_network`).

All randomness of a sample comes from (seed, epoch, index), and the order of an epoch from
(seed, epoch): a resumed run sees exactly the batches an uninterrupted one would have, and
N processes together see exactly the batches of one process, whatever the worker count.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.schema import ConfigError
from flowprep.store import Store
from flowprep.store_base import StoreError, VideoReader
from trainer import transforms as T
from trainer.streams import Input, get_input

MAX_OPEN = 64  # open videos kept per worker (HDF5 file handles, JPEG meta)


class StoreVideos:
    """Lazily opened readers, one cache per process: opened on first use inside each worker,
    never pickled across the fork (HDF5 handles must not be shared between processes)."""

    def __init__(self):
        self._stores: dict[str, Store] = {}
        self._open: OrderedDict[tuple[str, str], VideoReader] = OrderedDict()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, root: str, video_id: str) -> VideoReader:
        key = (root, video_id)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        if root not in self._stores:
            self._stores[root] = Store(root)
        reader = self._stores[root].open(video_id)
        self._open[key] = reader
        if len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return reader


class _StreamDataset(Dataset):
    """`store_root`: one store, or one per video (multi-task training over several datasets)."""

    def __init__(self, store_root: str | Path | list, video_ids: list[str], labels: list[int],
                 counts: list[tuple[int, int]], kind: Input, crop_size: int, flow_length: int = 10):
        self.videos = StoreVideos()
        self.video_ids, self.labels, self.counts = list(video_ids), list(labels), list(counts)
        roots = store_root if isinstance(store_root, (list, tuple)) else [store_root] * len(self.video_ids)
        self.roots = [str(r) for r in roots]
        self.kind, self.crop_size, self.flow_length = kind, int(crop_size), int(flow_length)
        self.negate = kind.negate_on_flip(self.flow_length)

    def __getstate__(self):
        # Workers start in a fresh process (make_loader): the input kind travels by name.
        return {**self.__dict__, "kind": self.kind.name}

    def __setstate__(self, state):
        self.__dict__.update(state, kind=get_input(state["kind"]))

    def positions(self, j: int) -> int:
        """How many sample starts (frames, or stacks) video j offers."""
        frames, flows = self.counts[j]
        return self.kind.positions(frames, flows, self.flow_length)

    def reader(self, j: int) -> VideoReader:
        return self.videos.get(self.roots[j], self.video_ids[j])

    def image(self, j: int, pos: int, box=None) -> np.ndarray:
        """C x H x W uint8: the stream input's sample of video j starting at `pos` (only the region
        `box` = (y, x, h, w) if given: a raw-coded store then reads no more than that)."""
        try:
            return self.kind.load(self.reader(j), int(pos), self.flow_length, box)
        except StoreError as e:  # name the video: a stored frame went bad after the check at start
            raise StoreError(f"{self.video_ids[j]}: {e}; run `flowprep verify` on the store") from e


class ClipDataset(_StreamDataset):
    """One sample per video: K segments, each one frame / one stack.

    train=True: a random position per segment, one multi-scale corner crop and flip shared by
    the segments; keys are (epoch, index) from EpochSampler. The flip is not applied here but
    returned, ((crops, flip), label), for the device to apply to the whole batch
    (transforms.flip_batch): on the CPU it would be a copy of every sample. train=False (val
    accuracy during training): the middle of each segment, center crop.
    """

    def __init__(self, *args, train: bool = True, segments: int = 1, seed: int = 0, **kw):
        super().__init__(*args, **kw)
        self.train, self.segments, self.seed = train, int(segments), int(seed)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, key):
        epoch, j = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, j]) if self.train else None
        pos = T.segment_index(self.positions(j), self.segments, rng)
        if self.train:
            w, h = self.reader(j).size
            box = T.multiscale_crop_box(h, w, rng)
            do_flip = rng.random() < 0.5
            crops = [T.resize(self.image(j, p, box), (self.crop_size, self.crop_size)) for p in pos]
            return (torch.stack([T.to_tensor(c) for c in crops]), torch.tensor(do_flip)), self.labels[j]
        crops = [T.eval_crops(self.image(j, p), self.crop_size, "center", self.negate)[0] for p in pos]
        return torch.stack([T.to_tensor(c) for c in crops]), self.labels[j]


class ProtocolDataset(_StreamDataset):
    """The paper's test protocol: item (video j, sample s) of `samples` evenly spaced frames or
    stacks per video, each as 1 (center) or 10 crops: returns ([crops, C, S, S], j)."""

    def __init__(self, *args, samples: int = 25, crops: str = "center", **kw):
        super().__init__(*args, **kw)
        if crops not in ("center", "ten"):
            raise ValueError(f"eval.crops must be 'center' or 'ten', got {crops!r}")
        self.samples, self.crops = int(samples), crops

    def __len__(self) -> int:
        return len(self.video_ids) * self.samples

    def __getitem__(self, i: int):
        j, s = divmod(int(i), self.samples)
        pos = T.evenly_spaced(self.positions(j), self.samples)[s]
        crops = T.eval_crops(self.image(j, pos), self.crop_size, self.crops, self.negate)
        return torch.stack([T.to_tensor(c) for c in crops]), j


class JointDataset(Dataset):
    """Aligned samples of several streams of the same videos, for training and scoring a
    TwoStreamNetwork end to end: each segment picks one moment of the video (a fraction of its
    frames, mapped onto each stream's own sample positions), and all streams share one crop
    box and one flip, so their features describe the same place at the same time.

    train=True: key (epoch, j) -> ([stream][K, C_k, S, S], label). train=False with `samples`:
    item (j, s) of the test protocol -> ([stream][crops, C_k, S, S], j).
    """

    def __init__(self, streams: list[_StreamDataset], train: bool = True, segments: int = 1, seed: int = 0,
                 samples: int = 0, crops: str = "center"):
        self.streams, self.train, self.segments, self.seed = streams, train, int(segments), int(seed)
        self.samples, self.crops = int(samples), crops
        self.base = streams[0]
        for s in streams[1:]:  # one reader per video for all streams (the cache is keyed by store and video)
            s.videos = self.base.videos

    def __len__(self) -> int:
        n = len(self.base.video_ids)
        return n * self.samples if self.samples else n

    def _images(self, j: int, frame: int) -> list[np.ndarray]:
        frames = max(self.base.counts[j][0], 1)
        u = frame / max(frames - 1, 1)
        return [s.image(j, round(u * (s.positions(j) - 1))) for s in self.streams]

    def __getitem__(self, key):
        if self.samples:  # the test protocol: 25 evenly spaced moments, centre or ten crops
            j, k = divmod(int(key), self.samples)
            frame = T.evenly_spaced(max(self.base.counts[j][0], 1), self.samples)[k]
            images = self._images(j, frame)
            return [torch.stack([T.to_tensor(c) for c in T.eval_crops(im, s.crop_size, self.crops, s.negate)])
                    for s, im in zip(self.streams, images)], j
        epoch, j = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, j]) if self.train else None
        moments = T.segment_index(max(self.base.counts[j][0], 1), self.segments, rng)
        per_moment = [self._images(j, m) for m in moments]
        out = [[] for _ in self.streams]
        if self.train:
            box = T.multiscale_crop_box(*per_moment[0][0].shape[1:], rng)
            do_flip = rng.random() < 0.5
        for images in per_moment:
            for k, (s, im) in enumerate(zip(self.streams, images)):
                crop = (T.train_crop(im, s.crop_size, rng, s.negate, box, do_flip) if self.train
                        else T.eval_crops(im, s.crop_size, "center", s.negate)[0])
                out[k].append(T.to_tensor(crop))
        return [torch.stack(x) for x in out], self.base.labels[j]


class EpochSampler(Sampler):
    """Shuffled order per (seed, epoch); each global batch of `batch_size` is cut into
    `world` equal, contiguous shares, one per rank. Incomplete last batch dropped.

    Yields (epoch, index) keys so that persistent workers need no epoch update.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"train.batch_size ({batch_size}) is the global batch and must divide by "
                             f"the number of processes ({world})")
        if n < batch_size:
            raise ValueError(f"only {n} training videos for a batch of {batch_size}; lower train.batch_size")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.batch) * (self.batch // self.world)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        share = self.batch // self.world
        for b in range(self.n // self.batch):
            start = b * self.batch + self.rank * share
            for i in order[start:start + share]:
                yield (self.epoch, int(i))


class ShardSampler(Sampler):
    """Every `world`-th index from `rank`, in order: disjoint shares covering all items (eval)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # one decode per worker process; OpenCV's own pool would oversubscribe


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, device: torch.device,
                seed: int = 0) -> DataLoader:
    """Workers decode in parallel, batches arrive pinned (CUDA) so copies can overlap compute.

    Workers start from a fresh process (forkserver), not a fork of this one: a fork copies the
    state of OpenCV's and OpenMP's thread pools mid-flight, and a worker then hangs in its first
    OpenCV call (seen after the parent had resized or remapped frames itself). A loader-own
    generator keeps the global torch RNG untouched by iterator creation, which keeps a resumed
    run's dropout masks identical to an uninterrupted run's.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=_worker_init,
                      multiprocessing_context="forkserver" if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


def training_loaders(train_set: Dataset, val_set: Dataset | None, batch_size: int, workers: int,
                     device: torch.device, seed: int, rank: int = 0, world: int = 1):
    """(sampler, training loader, validation loader or None) for one process of `world`:
    `batch_size` is the global batch, each process takes its share of every one. ConfigError
    for a batch the videos or processes cannot make."""
    try:
        sampler = EpochSampler(len(train_set), batch_size, seed, rank, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    per_rank = batch_size // world
    loader = DevicePrefetcher(make_loader(train_set, sampler, per_rank, workers, device, seed), device)
    val_loader = None
    if val_set is not None and len(val_set):
        val_loader = DevicePrefetcher(make_loader(val_set, ShardSampler(len(val_set), rank, world), per_rank,
                                                  workers, device, seed), device)
    return sampler, loader, val_loader


class DevicePrefetcher:
    """Iterate a loader with each batch already on the GPU: batch i+1 is copied on a side
    stream while batch i computes, so host-to-device copies never stall the compute stream.
    On the CPU it just passes batches through."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        side = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def to(t):
            return [to(x) for x in t] if isinstance(t, (list, tuple)) else t.to(self.device, non_blocking=True)

        def record(t):
            for x in t if isinstance(t, (list, tuple)) else [t]:
                record(x) if isinstance(x, (list, tuple)) else x.record_stream(compute)

        def copy(batch):
            if batch is None:
                return None
            with torch.cuda.stream(side):
                return to(batch)

        it = iter(self.loader)
        ready = copy(next(it, None))
        while ready is not None:
            compute.wait_stream(side)  # this batch's copy (queued before) is done before use
            record(ready)  # memory allocated on `side`, used on `compute`
            batch, ready = ready, copy(next(it, None))
            yield batch
