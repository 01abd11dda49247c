"""Frame sampling, crops and flips, for every stream input.

Images are planar C x H x W uint8 numpy arrays as a stream input loads them (trainer/streams.py):
RGB frames, or flow stacks ordered x1, y1, x2, y2, ... (quantized, 127.5 = no motion). A mirror
maps the channels the input names (`negate`, e.g. every flow-x channel) to 255 - q, the exact
sign change in the quantized domain. Crops and resizes stay on uint8 in the loader workers (a
crop is a view, and uint8 is a quarter of float32's bytes to collate, pin and copy); the
training flip (`flip_batch`), conversion and normalisation happen on the device, batched, where
they cost next to nothing (`Input.to_network`). Test crops flip in the workers (`ten_crop`).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

SCALES = (1.0, 0.875, 0.75, 0.66)  # TSN multi-scale crop


# ---------------------------------------------------------------- sampling

def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k indices spanning 0..n-1 evenly (first and last included); repeats when n < k."""
    if n < 1:
        raise ValueError(f"cannot sample from {n} items")
    if k == 1:
        return np.array([(n - 1) // 2])
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def segment_index(n: int, segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN sampling: one index per equal segment of 0..n-1, random within it (train) or its middle (rng None)."""
    edges = np.linspace(0, n, segments + 1)
    lo = np.floor(edges[:-1]).astype(np.int64)
    hi = np.maximum(np.ceil(edges[1:]).astype(np.int64) - 1, lo)
    if rng is None:
        return (lo + hi) // 2
    return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)], dtype=np.int64)


# ---------------------------------------------------------------- train crops

def multiscale_crop_box(h: int, w: int, rng: np.random.Generator, scales=SCALES, max_distort: int = 1):
    """TSN multi-scale corner crop: (y, x, ch, cw) with sides from scales x short side, at a corner or the center."""
    base = min(h, w)
    sizes = [int(base * s) for s in scales]
    pairs = [(sh, sw) for i, sh in enumerate(sizes) for j, sw in enumerate(sizes) if abs(i - j) <= max_distort]
    ch, cw = pairs[rng.integers(len(pairs))]
    dy, dx = h - ch, w - cw
    y, x = [(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2)][rng.integers(5)]
    return y, x, ch, cw


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize C x H x W uint8 to (height, width), plane by plane into one contiguous array (OpenCV
    is faster on single planes than on many-channel images, and crops of planes need no copy)."""
    h, w = size
    if img.shape[1:] == (h, w):
        return img
    out = np.empty((img.shape[0], h, w), np.uint8)
    for c in range(img.shape[0]):
        cv2.resize(img[c], (w, h), dst=out[c], interpolation=cv2.INTER_LINEAR)
    return out


def flip(img: np.ndarray, negate: slice | None) -> np.ndarray:
    """Mirror left-right; the `negate` channels (flow x: 0, 2, 4, ...) change sign: q -> 255 - q."""
    out = np.ascontiguousarray(img[:, :, ::-1])
    if negate is not None:
        out[negate] = 255 - out[negate]
    return out


def crop(img: np.ndarray, box) -> np.ndarray:
    y, x, h, w = box
    return img[:, y:y + h, x:x + w]


def train_crop(img: np.ndarray, size: int, rng: np.random.Generator, negate: slice | None, box=None,
               do_flip=None) -> np.ndarray:
    """Multi-scale corner crop resized to size x size, flipped with probability 1/2.

    Pass `box` and `do_flip` to apply the same choice to several images (TSN segments).
    """
    box = box if box is not None else multiscale_crop_box(*img.shape[1:], rng)
    out = resize(crop(img, box), (size, size))
    if do_flip if do_flip is not None else rng.random() < 0.5:
        out = flip(out, negate)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------- test crops

def resize_short(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[1:]
    if min(h, w) == short:
        return img
    if h <= w:
        return resize(img, (short, max(short, round(w * short / h))))
    return resize(img, (max(short, round(h * short / w)), short))


def eval_scale(crop_size: int) -> int:
    """Short side before test crops: 256 for 224 crops, as in the paper, proportionally otherwise."""
    return round(crop_size * 256 / 224)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[1:]
    y, x = (h - size) // 2, (w - size) // 2
    return img[:, y:y + size, x:x + size]


def ten_crop(img: np.ndarray, size: int, negate: slice | None) -> list[np.ndarray]:
    """4 corners + center, then the same five mirrored (flow x inverted on the mirrored ones)."""
    h, w = img.shape[1:]
    boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = [img[:, y:y + size, x:x + size] for y, x in boxes]
    return [np.ascontiguousarray(c) for c in crops] + [flip(c, negate) for c in crops]


def eval_crops(img: np.ndarray, size: int, crops: str, negate: slice | None) -> list[np.ndarray]:
    """Resize the short side to `eval_scale(size)`, then one center crop or ten crops."""
    img = resize_short(img, eval_scale(size))
    if crops == "center":
        return [np.ascontiguousarray(center_crop(img, size))]
    if crops == "ten":
        return ten_crop(img, size, negate)
    raise ValueError(f"eval.crops must be 'center' or 'ten', got {crops!r}")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """C x H x W uint8 numpy -> tensor (contiguous: a batch is then one plain copy)."""
    return torch.from_numpy(np.ascontiguousarray(img))


def flip_batch(x: torch.Tensor, flips: torch.Tensor, negate: slice | None) -> torch.Tensor:
    """The training flip, on the device for a whole batch: samples with `flips` set are mirrored
    and their `negate` channels mapped q -> 255 - q, exactly as `flip` does on one image.

    x: uint8 [B, K, C, S, S] (K segments share their sample's flip); flips: bool [B].
    """
    mirrored = x.flip(-1)
    if negate is not None:
        mirrored[:, :, negate] = 255 - mirrored[:, :, negate]
    return torch.where(flips.view(-1, 1, 1, 1, 1), mirrored, x)
