import numpy as np
import pytest
import torch

from trainer import transforms as T
from trainer.streams import IMAGENET_MEAN, IMAGENET_STD, INPUTS, clamped

X = slice(0, None, 2)  # flow x channels


def test_evenly_spaced_25_span_the_video():
    idx = T.evenly_spaced(100, 25)
    assert len(idx) == 25 and idx[0] == 0 and idx[-1] == 99
    assert np.all(np.diff(idx) > 0)
    assert np.ptp(np.diff(idx)) <= 1  # even gaps


def test_evenly_spaced_short_video_repeats_frames():
    idx = T.evenly_spaced(7, 25)
    assert len(idx) == 25 and idx.min() == 0 and idx.max() == 6
    assert set(idx) == set(range(7))
    assert T.evenly_spaced(1, 25).tolist() == [0] * 25


def test_stacks_stay_inside_the_video_even_when_shorter_than_L():
    flow = INPUTS["flow"]
    starts = T.evenly_spaced(flow.positions(41, 40, 10), 25)
    assert starts[0] == 0 and starts[-1] == 30  # last stack ends on the last flow
    starts = T.evenly_spaced(flow.positions(5, 4, 10), 25)
    assert set(starts) == {0}
    assert clamped(0, 10, 4) == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_segment_index_train_random_within_segments_and_middle_at_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = T.segment_index(30, 3, rng)
        assert 0 <= idx[0] < 10 <= idx[1] < 20 <= idx[2] < 30
    assert T.segment_index(30, 3, None).tolist() == [4, 14, 24]
    assert T.segment_index(2, 3, None).max() <= 1  # fewer frames than segments


def flow_image(h=8, w=10, channels=4):
    """C x H x W, as stream inputs load it."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (channels, h, w), dtype=np.uint8)


def test_flip_inverts_flow_x_only():
    img = flow_image()
    out = T.flip(img, negate=X)
    assert np.array_equal(out[0::2], 255 - img[0::2, :, ::-1])  # x channels: mirrored and negated
    assert np.array_equal(out[1::2], img[1::2, :, ::-1])        # y channels: mirrored only
    rgb = flow_image(channels=3)
    assert np.array_equal(T.flip(rgb, negate=None), rgb[:, :, ::-1])
    # 255 - q is the exact mirror in the quantized domain: twice is the identity.
    assert np.array_equal(T.flip(T.flip(img, X), X), img)


def test_multiscale_crop_boxes_use_tsn_scales_at_corners_or_center():
    rng = np.random.default_rng(0)
    h, w = 256, 340
    sizes = {int(256 * s) for s in T.SCALES}
    seen = set()
    for _ in range(300):
        y, x, ch, cw = T.multiscale_crop_box(h, w, rng)
        assert ch in sizes and cw in sizes
        assert (y in (0, h - ch, (h - ch) // 2)) and (x in (0, w - cw, (w - cw) // 2))
        seen.add((y == 0, x == 0))
    assert len(seen) == 4
    out = T.train_crop(flow_image(48, 64, 20), 32, rng, negate=X)
    assert out.shape == (20, 32, 32) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_planar_resize_equals_opencvs_resize_of_the_image():
    import cv2

    img = flow_image(40, 52, 6)
    want = cv2.resize(np.ascontiguousarray(img.transpose(1, 2, 0)), (32, 24), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(T.resize(img, (24, 32)), want.transpose(2, 0, 1))
    crop = T.crop(img, (3, 5, 20, 30))  # a view of the planes
    assert np.array_equal(T.resize(crop, (20, 30)), img[:, 3:23, 5:35])


def position_image(h, w, channels):
    """Channel 0 = column, channel 1 = row, so crops reveal where they came from (C x H x W)."""
    img = np.zeros((channels, h, w), np.uint8)
    img[0] = np.arange(w)[None, :]
    img[1] = np.arange(h)[:, None]
    return img


def test_ten_crops_are_corners_center_and_flipped_with_flow_x_inverted():
    img = position_image(40, 50, 4)
    crops = T.ten_crop(img, 20, negate=X)
    assert len(crops) == 10
    tl = [(c[1, 0, 0], c[0, 0, 0]) for c in crops[:5]]  # (row, col) of each crop's top-left pixel
    assert tl == [(0, 0), (0, 30), (20, 0), (20, 30), (10, 15)]
    for plain, mirrored in zip(crops[:5], crops[5:]):
        assert np.array_equal(mirrored[0], 255 - plain[0, :, ::-1])  # x flow negated
        assert np.array_equal(mirrored[1], plain[1, :, ::-1])
    rgb = T.ten_crop(position_image(40, 50, 3), 20, negate=None)
    assert np.array_equal(rgb[5][0], rgb[0][0, :, ::-1])  # RGB mirrored, not negated


def test_eval_crops_resize_short_side_like_the_paper():
    img = position_image(256, 340, 3)
    (c,) = T.eval_crops(img, 224, "center", negate=None)
    assert c.shape == (3, 224, 224)
    assert c[1, 0, 0] == 16 and c[0, 0, 0] == 58  # 256 short side kept, centered
    assert len(T.eval_crops(img, 224, "ten", negate=None)) == 10
    small = T.eval_crops(position_image(40, 48, 6), 32, "ten", negate=X)
    assert all(x.shape == (6, 32, 32) for x in small)
    with pytest.raises(ValueError, match="center' or 'ten"):
        T.eval_crops(img, 224, "five", negate=None)


def test_normalize_rgb_and_flow_with_mean_subtraction():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = INPUTS["rgb"].to_network(x, 1, False)
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    f = torch.randint(0, 256, (2, 6, 8, 8), dtype=torch.uint8)
    g = INPUTS["flow"].to_network(f, 3, True)
    assert g.mean(dim=(2, 3)).abs().max() < 1e-5
    zero = INPUTS["flow"].to_network(torch.full((1, 2, 2, 2), 128, dtype=torch.uint8), 1, False)
    assert zero.abs().max() < 0.01  # quantized zero motion maps to about 0
