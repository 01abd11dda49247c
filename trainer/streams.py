"""Stream inputs: one definition per input kind, read by the loaders, the models, training,
evaluation, fusion and prediction alike.

An input kind says what a sample is made of (which store modalities it reads, from which
start positions), how many channels the loader yields and the network sees for a stack
length L, which channels a horizontal mirror negates, and how the device turns the uint8
batch into network input. Nothing else in the trainer branches on what a stream is: a new
input is one `Input` entry in INPUTS.

Loaders yield planar C x H x W uint8 (quantized flow, 127.5 = no motion; RGB as stored), so
crops, resizes and collation move a quarter of float32's bytes; `to_network` converts on the device.

Kinds (L = `flow_length` of the stream):
- rgb         one frame (the paper's spatial stream), 3 channels.
- flow        L stacked forward flows x1, y1, ..., xL, yL from position t (temporal stream).
- flow_bidir  L/2 forward flows from frame t on, then L/2 backward flows of the frames before
              t (paper sec. 3.1), 2L channels; needs `flowprep extract --direction both`.
- trajectory  flow sampled along the motion trajectories (paper eq. 2): p1 = p,
              p(k+1) = p(k) + d_k(p(k)); channel pair k is d_k(p(k)), bilinear; 2L channels,
              computed in the loader from the stored forward flows.
- rgb_stack   L+1 consecutive frames, 3(L+1) channels (the paper's motion-from-RGB baseline).
- rgb_diff    the L differences of L+1 consecutive frames (TSN), 3L channels; the loader
              yields the frames and the device takes the differences (uint8 cannot hold them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_CENTER = 127.5       # quantized zero motion
FLOW_SCALE = 255 * 0.226  # TSN's flow std: flow lands in about the range of normalised RGB


@dataclass(frozen=True)
class Input:
    name: str
    doc: str
    reads: tuple[str, ...]                         # store modalities: "rgb", "flow", "bflow"
    load_channels: Callable[[int], int]            # channels the loader yields, for L
    channels: Callable[[int], int]                 # channels the network takes, for L
    negate_on_flip: Callable[[int], slice | None]  # loaded channels a mirror maps q -> 255 - q
    positions: Callable[[int, int, int], int]      # (frames, flows, L) -> sample starts (>= 1)
    load: Callable[..., np.ndarray]                # (reader, start, L, box=None) -> C x h x w uint8
    to_network: Callable                           # (uint8 NxCxHxW tensor, L, mean_subtraction) -> float
    is_flow: bool                                  # flow values: mean subtraction, flow init apply

    @property
    def needs_rgb(self) -> bool:
        return "rgb" in self.reads


# ---------------------------------------------------------------- loading
# Loaders return planar C x H x W uint8 (the network's layout): crops are views of whole planes,
# resizes go plane by plane into the batch's own layout, and collation is a plain copy. With a
# `box` = (y, x, h, w) they return only that region, which a raw-coded HDF5 store reads alone.

def clamped(start: int, length: int, count: int) -> list[int]:
    """Indices start .. start+length-1, the last one repeated past the end of a short video."""
    return [min(max(start + j, 0), count - 1) for j in range(length)]


def _crop(img: np.ndarray, box) -> np.ndarray:
    if box is None:
        return img
    y, x, h, w = box
    return img[..., y:y + h, x:x + w]


def _rgb(reader, t: int, box=None) -> np.ndarray:
    return np.ascontiguousarray(_crop(reader.rgb(t).transpose(2, 0, 1), box))


def _frames(reader, start: int, n: int, box=None) -> np.ndarray:
    return np.concatenate([_rgb(reader, i, box) for i in clamped(start, n, reader.num_frames)])


def _flows(reader, start: int, n: int, backward: bool = False, box=None) -> np.ndarray:
    count = reader.num_bflows if backward else reader.num_flows
    if 0 <= start and start + n <= count:
        return reader.flow_planes(start, n, backward, box)  # two reads where the store allows
    return np.concatenate([reader.flow_planes(i, 1, backward, box) for i in clamped(start, n, count)])


def _load_bidir(reader, start: int, length: int, box=None) -> np.ndarray:
    half = length // 2
    t = start + half  # the first forward flow; the backward ones are those of the frames before it
    return np.concatenate([_flows(reader, t, half, box=box), _flows(reader, t - half, half, True, box)])


def trajectory_stack(planes: np.ndarray, bound: float) -> np.ndarray:
    """Quantized 2L x H x W forward flows (x1, y1, ...) -> the flows sampled along each pixel's
    trajectory: p1 = p, p(k+1) = p(k) + d_k(p(k)); planes 2k, 2k+1 hold d_k(p(k)), bilinear,
    the frame's border values outside it. Quantized again with the same bound."""
    c, h, w = planes.shape
    scale = np.float32(2 * bound / 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px, py = xx.copy(), yy.copy()
    out = np.empty_like(planes)
    for k in range(c // 2):
        d = [cv2.remap(planes[2 * k + i].astype(np.float32) * scale - np.float32(bound), px, py, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE) for i in (0, 1)]
        for i in (0, 1):
            out[2 * k + i] = np.clip(np.rint((d[i] + np.float32(bound)) / scale), 0, 255).astype(np.uint8)
        px += d[0]
        py += d[1]
    return out


def _load_trajectory(reader, start: int, length: int, box=None) -> np.ndarray:
    # whole frames: trajectories leave any crop
    return _crop(trajectory_stack(_flows(reader, start, length), float(reader.meta.get("bound", 20.0))), box)


# ---------------------------------------------------------------- on the device

def _imagenet(x, frames: int):
    """uint8 NxCxHxW of `frames` RGB frames stacked on C -> float, ImageNet mean/std per colour."""
    x = x.float()
    # Out of place: a traced export keeps these as constants, and mul_ would scale them on every call.
    mean = (x.new_tensor(IMAGENET_MEAN) * 255).repeat(frames).view(1, -1, 1, 1)
    std = (x.new_tensor(IMAGENET_STD) * 255).repeat(frames).view(1, -1, 1, 1)
    return (x - mean) / std


def _rgb_net(x, length: int, mean_subtraction: bool):
    return _imagenet(x, 1)


def _rgb_stack_net(x, length: int, mean_subtraction: bool):
    return _imagenet(x, length + 1)


def _rgb_diff_net(x, length: int, mean_subtraction: bool):
    f = _imagenet(x, length + 1)
    return f[:, 3:] - f[:, :-3]


def _flow_net(x, length: int, mean_subtraction: bool):
    """Centred on zero motion, scaled like normalised RGB; with mean subtraction each flow
    field also loses its spatial mean (the paper's camera-motion compensation)."""
    x = (x.float() - FLOW_CENTER) / FLOW_SCALE
    if mean_subtraction:
        x = x - x.mean(dim=(2, 3), keepdim=True)
    return x


# ---------------------------------------------------------------- the kinds

def _stack_starts(frames: int, flows: int, length: int) -> int:
    return max(flows - length + 1, 1)


def _two_l(length: int) -> int:
    return 2 * length


_X_CHANNELS = slice(0, None, 2)

INPUTS: dict[str, Input] = {i.name: i for i in (
    Input("rgb", "one RGB frame (the spatial stream)", ("rgb",), lambda L: 3, lambda L: 3, lambda L: None,
          lambda frames, flows, L: max(frames, 1), lambda r, t, L, box=None: _rgb(r, int(t), box), _rgb_net, False),
    Input("flow", "L stacked forward flows x1,y1,...,xL,yL (the temporal stream)", ("flow",), _two_l, _two_l,
          lambda L: _X_CHANNELS, _stack_starts, lambda r, t, L, box=None: _flows(r, t, L, box=box), _flow_net, True),
    Input("flow_bidir", "L/2 forward flows from t, then L/2 backward flows before t", ("flow", "bflow"), _two_l,
          _two_l, lambda L: _X_CHANNELS, _stack_starts, _load_bidir, _flow_net, True),
    Input("trajectory", "L forward flows sampled along the motion trajectories (paper eq. 2)", ("flow",), _two_l,
          _two_l, lambda L: _X_CHANNELS, _stack_starts, _load_trajectory, _flow_net, True),
    Input("rgb_stack", "L+1 consecutive RGB frames", ("rgb",), lambda L: 3 * (L + 1), lambda L: 3 * (L + 1),
          lambda L: None, lambda frames, flows, L: max(frames - L, 1),
          lambda r, t, L, box=None: _frames(r, t, L + 1, box), _rgb_stack_net, False),
    Input("rgb_diff", "the L differences of L+1 consecutive RGB frames (TSN)", ("rgb",), lambda L: 3 * (L + 1),
          lambda L: 3 * L, lambda L: None, lambda frames, flows, L: max(frames - L, 1),
          lambda r, t, L, box=None: _frames(r, t, L + 1, box), _rgb_diff_net, False),
)}

# The names streams had before they were named: `--stream spatial|temporal` and the
# [spatial] / [temporal] sections of older pipelines.
DEFAULT_STREAMS = {"spatial": "rgb", "temporal": "flow"}


def get_input(name: str) -> Input:
    if name not in INPUTS:
        raise ValueError(f"unknown stream input {name!r}; choose one of {', '.join(INPUTS)}")
    return INPUTS[name]


def check_length(kind: Input, length: int) -> None:
    """L constraints of a kind (raises ValueError naming the fix)."""
    if length < 1:
        raise ValueError(f"flow_length must be >= 1, got {length}")
    if kind.name == "flow_bidir" and length % 2:
        raise ValueError(f"input flow_bidir takes L/2 flows each way, so flow_length must be even, got {length}")
