"""Flow algorithms recover a known motion; presets are what --help says."""
import numpy as np
import pytest

from flowprep.presets import TVL1_PRESETS as PRESETS
from flowprep.flow import flow_params, flow_spec, make_flow, make_flow_batch
from videos import smooth_field, textured_frame, warp_by_flow

H, W = 96, 128
MARGIN = 12  # borders have no texture coming in from outside the frame


def mean_epe(est, true):
    d = np.linalg.norm(est - true, axis=-1)[MARGIN:-MARGIN, MARGIN:-MARGIN]
    return float(d.mean())


@pytest.fixture(scope="module")
def pair():
    prev = textured_frame(H, W, seed=1, channels=1)
    field = smooth_field(H, W, amplitude=1.0, base=(2.0, -1.0))
    return prev, warp_by_flow(prev, field), field


@pytest.mark.parametrize("algo,preset", [("tvl1", "accurate"), ("tvl1", "fast"), ("farneback", "accurate")])
def test_recovers_known_smooth_motion(pair, algo, preset):
    prev, nxt, field = pair
    flow = make_flow(algo, preset)(prev, nxt)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    assert mean_epe(flow, field) < 0.3
    # and it is the motion, not a lucky constant: zero flow would be far off
    assert mean_epe(np.zeros_like(field), field) > 2.0


def test_tvl1_is_deterministic(pair):
    prev, nxt, _ = pair
    f = make_flow("tvl1", "fast")
    assert np.array_equal(f(prev, nxt), f(prev, nxt))


def test_batch_hook_matches_single_pair_flow(pair):
    prev, nxt, _ = pair
    batch, size = make_flow_batch(flow_spec("tvl1", "fast", "cpu"))
    assert size >= 1
    flows = batch([prev, nxt], [nxt, prev])
    assert len(flows) == 2
    assert np.array_equal(flows[0], make_flow("tvl1", "fast")(prev, nxt))


def test_presets():
    assert PRESETS["accurate"] == dict(tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01,
                                       inner_iterations=30, outer_iterations=10, scale_step=0.8, median_filtering=5)
    fast, acc = PRESETS["fast"], PRESETS["accurate"]
    work = lambda p: p["warps"] * p["outer_iterations"] * p["inner_iterations"]  # noqa: E731
    assert work(fast) * 5 < work(acc)
    with pytest.raises(ValueError, match="preset"):
        flow_params("tvl1", "slow")
    with pytest.raises(ValueError, match="algorithm"):
        flow_params("lucas-kanade")


@pytest.mark.parametrize("algo,preset", [("dis", "ultrafast"), ("dis", "fast"), ("dis", "medium"),
                                         ("deepflow", None), ("lk", None), ("farneback", None)])
def test_every_algorithm_recovers_a_known_translation(algo, preset):
    """A texture shifted by (2.5, -1.5) px: every algorithm finds it within half a pixel."""
    prev = textured_frame(H, W, seed=3, channels=1)
    shift = np.full((H, W, 2), (2.5, -1.5), np.float32)
    nxt = warp_by_flow(prev, shift)
    flow = make_flow(algo, preset)(prev, nxt)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    assert mean_epe(flow, shift) < 0.5, mean_epe(flow, shift)
    assert abs(np.median(flow[MARGIN:-MARGIN, MARGIN:-MARGIN, 0]) - 2.5) < 0.5  # x is x, with its sign
    assert abs(np.median(flow[MARGIN:-MARGIN, MARGIN:-MARGIN, 1]) + 1.5) < 0.5


def test_presets_belong_to_their_algorithm():
    assert flow_params("dis", None) == flow_params("dis", "medium")
    assert flow_params("dis", "ultrafast")["PatchSize"] == 8 and flow_params("dis", "medium")["PatchStride"] == 3
    assert flow_params("lk")["grid_step"] == 8
    with pytest.raises(ValueError, match="presets of dis: ultrafast, fast, medium"):
        flow_params("dis", "accurate")
    with pytest.raises(ValueError, match="leave --preset out"):
        flow_params("deepflow", "medium")
