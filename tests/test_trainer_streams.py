"""Stream inputs (trainer/streams.py): channel counts and order, what a mirror does to each,
trajectory stacking against known motions, and that each motion input learns the direction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowprep.quant import dequantize, quantize
from flowprep.store import Store, open_writer
from flowprep.store_files import write_store_info
from trainer import transforms as T
from trainer.streams import INPUTS, trajectory_stack
from trainer.train import main as train
from trainer.evaluate import score_stream
from trainer_toy import make_toy, toy_config
from twostream.pipeline import validate

H, W, N = 24, 32, 9  # frames per video: 8 flows


def write_video(root, vid, fwd, bwd, frames, fmt="jpeg"):
    with open_writer(fmt, root, vid, jpeg_quality=100) as w:
        for f in frames:
            w.write_rgb(f)
        for q in fwd:
            w.write_flow(quantize(q))
        for q in bwd:
            w.write_flow(quantize(q), backward=True)
        w.commit({"bound": 20.0, "size": [W, H]})


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """Flow i is constant (i + 1, -(i + 1) / 2) px forward and (-(i + 1), (i + 1) / 2) backward;
    frame i is a constant grey 20 * i: every channel says where it came from."""
    root = tmp_path_factory.mktemp("coded")
    write_store_info(root, {"format": "jpeg", "bound": 20.0})
    fwd = [np.full((H, W, 2), (i + 1, -(i + 1) / 2), np.float32) for i in range(N - 1)]
    bwd = [-f for f in fwd]
    frames = [np.full((H, W, 3), 20 * i, np.uint8) for i in range(N)]
    write_video(root, "c/v", fwd, bwd, frames)
    return Store(root).open("c/v")


@pytest.mark.parametrize("name,length,channels", [("rgb", 4, 3), ("flow", 4, 8), ("flow_bidir", 4, 8),
                                                  ("trajectory", 4, 8), ("rgb_stack", 4, 15), ("rgb_diff", 4, 15)])
def test_each_input_loads_its_channels_in_order(coded, name, length, channels):
    kind = INPUTS[name]
    t = 2
    x = kind.load(coded, t, length)
    assert x.shape == (channels, H, W) == (kind.load_channels(length), H, W)
    v = dequantize(x[:, 0, 0]) if kind.is_flow else x[:, 0, 0].astype(float)
    if name in ("flow", "trajectory"):  # x_k, y_k of flows t .. t+L-1 (constant motion: trajectory = flow)
        expect = [c for i in range(t, t + length) for c in (i + 1, -(i + 1) / 2)]
    elif name == "flow_bidir":  # L/2 forward from t' = t + L/2, then the L/2 backward flows before t'
        tt = t + length // 2
        expect = [c for i in range(tt, tt + 2) for c in (i + 1, -(i + 1) / 2)] + \
                 [c for i in range(tt - 2, tt) for c in (-(i + 1), (i + 1) / 2)]
    elif name == "rgb":
        expect = [20 * t] * 3
    else:  # rgb_stack, rgb_diff: frames t .. t+L
        expect = [20 * i for i in range(t, t + length + 1) for _ in range(3)]
    np.testing.assert_allclose(v, expect, atol=20 / 255 + 1e-4 if kind.is_flow else 0)
    net = kind.to_network(torch.from_numpy(x)[None], length, False)
    assert np.array_equal(kind.load(coded, t, length, box=(2, 3, 10, 12)), x[:, 2:12, 3:15])  # a region alone
    assert net.shape[1] == kind.channels(length)
    if name == "rgb_diff":  # network sees the L differences of consecutive (normalised) frames
        std = torch.tensor([0.229, 0.224, 0.225]).repeat(length) * 255
        np.testing.assert_allclose(net[0, :, 0, 0].numpy(), (20 / std).numpy(), rtol=1e-5)


def mirrored(f):
    """The flow of mirrored frames: the field mirrored, its x component negated."""
    m = f[:, ::-1].copy()
    m[..., 0] *= -1
    return m


def smooth_fields(n, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return [np.stack([a * np.sin(xx / 5 + p) + 1.5, b * np.cos(yy / 4 + p) - 0.5], -1).astype(np.float32)
            for a, b, p in rng.uniform(0.5, 2.5, (n, 3))]


@pytest.mark.parametrize("name", ["flow", "flow_bidir", "trajectory"])
def test_input_of_mirrored_frames_is_the_mirrored_input(tmp_path, name):
    fwd, bwd = smooth_fields(N - 1, 1), smooth_fields(N - 1, 2)
    frames = [np.zeros((H, W, 3), np.uint8)] * N
    write_store_info(tmp_path, {"format": "hdf5", "bound": 20.0})
    write_video(tmp_path, "a/v", fwd, bwd, frames, "hdf5")
    write_video(tmp_path, "a/m", [mirrored(f) for f in fwd], [mirrored(f) for f in bwd], frames, "hdf5")
    kind = INPUTS[name]
    store = Store(tmp_path)
    with store.open("a/v") as v, store.open("a/m") as m:
        plain, of_mirror = kind.load(v, 1, 6), kind.load(m, 1, 6)
    flipped = T.flip(plain, kind.negate_on_flip(6))
    diff = np.abs(flipped.astype(int) - of_mirror.astype(int))
    assert diff.max() <= 1, diff.max()  # equal within one quantization step
    assert np.abs(plain.astype(int) - of_mirror.astype(int)).max() > 10  # and the mirror did change it


def test_trajectory_recovers_constant_motion_exactly():
    q = quantize(np.full((H, W, 2), (1.4, -0.6), np.float32)).transpose(2, 0, 1)
    stack = np.concatenate([q] * 5)
    assert np.array_equal(trajectory_stack(stack, 20.0), stack)


def test_trajectory_follows_a_rotation_within_half_a_pixel():
    size = 48
    theta, c = np.deg2rad(6.0), np.array([size / 2, size / 2])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    p = np.stack([xx, yy], -1) - c
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    field = (p @ rot.T - p).astype(np.float32)  # each frame turns the scene by theta about the centre
    L = 5
    out = dequantize(trajectory_stack(np.concatenate([quantize(field).transpose(2, 0, 1)] * L), 20.0))
    out = out.transpose(1, 2, 0)  # H x W x 2L, to compare with the field
    inside = np.linalg.norm(p, axis=-1) < size / 2 - 2  # stays in the frame for all L steps
    pk = p.copy()
    for k in range(L):  # the true displacement at the point reached after k steps
        truth = pk @ rot.T - pk
        err = np.linalg.norm(out[..., 2 * k:2 * k + 2] - truth, axis=-1)[inside]
        assert err.max() < 0.5, (k, err.max())
        pk = pk @ rot.T
    # not a lucky constant: the plain flow stack differs from the trajectory after a few steps
    assert np.abs(out[..., 8:10] - field)[inside].max() > 0.5


def reference_trajectory(planes: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """Eq. 2 written out: bilinear sampling by hand, positions clamped to the frame."""
    c, h, w = planes.shape
    f = dequantize(planes, bound).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    px, py, out = xx.copy(), yy.copy(), np.zeros_like(f)
    for k in range(c // 2):
        x, y = np.clip(px, 0, w - 1), np.clip(py, 0, h - 1)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        ax, ay = x - x0, y - y0
        for i in (0, 1):
            g = f[2 * k + i]
            out[2 * k + i] = (g[y0, x0] * (1 - ax) * (1 - ay) + g[y0, x1] * ax * (1 - ay)
                              + g[y1, x0] * (1 - ax) * ay + g[y1, x1] * ax * ay)
        px, py = px + out[2 * k], py + out[2 * k + 1]
    return quantize(out, bound)


def test_trajectory_of_changing_fields_follows_eq_2():
    """Rough fields that differ from step to step (random, up to 3 px), so that sampling a wrong
    pixel, plane or step shows; smooth or repeated fields would hide it."""
    planes = np.random.default_rng(7).integers(108, 148, (6, H, W), dtype=np.uint8)
    got = trajectory_stack(planes, 20.0).astype(int)
    assert np.abs(got - reference_trajectory(planes)).max() <= 1  # one quantization step
    assert np.abs(got - planes).max() > 5  # and it is not the plain stack


@pytest.fixture(scope="module")
def motion_with_backward(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion_bwd")
    store, splits = make_toy(root, "hdf5", train_per_class=16, test_per_class=16, frames=6, square=20, speed=3,
                             backward=True)
    return root, store, splits


@pytest.mark.slow
def test_each_motion_input_learns_the_direction(motion_with_backward, capsys):
    """Up vs down from motion alone (single frames look alike): every flow input far above chance."""
    root, store, splits = motion_with_backward
    acc = {}
    for name in ("flow", "flow_bidir", "trajectory", "rgb_stack"):
        cfg = toy_config(root / name, store, splits, epochs=6, lr=0.003)
        cfg = validate({**cfg, "streams": {"motion": {"input": name, "flow_length": 4}}})
        train(cfg, "motion")
        s = score_stream(cfg, "motion", "test", show=False)
        acc[name] = float(np.mean(s.scores.argmax(1) == s.labels))
    with capsys.disabled():
        print(f"\nmotion-only toy, test accuracy (32 videos, chance 0.5): {acc}")
    assert min(acc["flow"], acc["flow_bidir"], acc["trajectory"]) >= 0.85, acc
