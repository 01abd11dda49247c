import numpy as np
import pytest
import torch

from flowprep.store import Store
from trainer.data import ClipDataset, EpochSampler, ShardSampler
from trainer.streams import INPUTS
from trainer_toy import make_toy


@pytest.fixture(scope="module", params=["jpeg", "hdf5"])
def store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return make_toy(root, request.param, train_per_class=2, test_per_class=1, frames=6)[0]


def test_flow_stack_is_x1_y1_x2_y2_in_order(store):
    with Store(store).open("up/v_up_train000") as v:
        stack = v.flow_stack(1, 3)
        expected = np.concatenate([v.flow(1), v.flow(2), v.flow(3)], axis=-1)
        assert stack.shape == (40, 48, 6) and np.array_equal(stack, expected)
        with pytest.raises(IndexError):
            v.flow_stack(3, 3)


@pytest.mark.parametrize("stream,channels", [("rgb", 3), ("flow", 20)])
def test_train_samples_are_uint8_and_a_function_of_seed_epoch_index(store, stream, channels):
    ids = ["down/v_down_train000", "up/v_up_train001"]
    # temporal with L = 10 > 5 flows: the last flow repeats
    ds = ClipDataset(store, ids, [0, 1], [(6, 5)] * 2, kind=INPUTS[stream], crop_size=32, flow_length=10,
                     train=True, segments=3, seed=7)
    (x, flip), y = ds[(2, 1)]
    assert x.shape == (3, channels, 32, 32) and x.dtype == torch.uint8 and y == 1 and flip.dtype == torch.bool
    assert torch.equal(ds[(2, 1)][0][0], x)
    assert any(not torch.equal(ds[(e, 1)][0][0], x) for e in range(3, 8))
    assert {bool(ds[(e, 1)][0][1]) for e in range(12)} == {True, False}  # flips are chosen, half the time
    val = ClipDataset(store, ids, [0, 1], [(6, 5)] * 2, kind=INPUTS[stream], crop_size=32, flow_length=10, train=False)
    assert val[0][0].shape == (1, channels, 32, 32)


def test_process_shares_of_a_global_batch_add_up_to_the_single_process_batch():
    one = list(EpochSampler(21, 8, seed=3))
    assert len(one) == 16 and len({i for _, i in one}) == 16  # incomplete last batch dropped
    shares = [list(EpochSampler(21, 8, seed=3, rank=r, world=2)) for r in range(2)]
    for step in range(2):
        merged = shares[0][4 * step:4 * step + 4] + shares[1][4 * step:4 * step + 4]
        assert merged == one[8 * step:8 * step + 8]
    s = EpochSampler(21, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != one and all(e == 1 for e, _ in s)
    assert sorted(list(ShardSampler(5, 0, 2)) + list(ShardSampler(5, 1, 2))) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="divide by"):
        EpochSampler(21, 8, world=3)


@pytest.mark.parametrize("negate", [None, slice(0, None, 2)])
def test_the_batch_flip_on_the_device_is_the_image_flip(negate):
    from trainer import transforms as T

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 2, 6, 9, 11), dtype=np.uint8)  # B, K, C, H, W as loaders give it
    flips = torch.tensor([True, False, True, False])
    out = T.flip_batch(torch.from_numpy(imgs.copy()), flips, negate)
    for b in range(4):
        for k in range(2):
            want = T.flip(imgs[b, k], negate) if flips[b] else imgs[b, k]
            assert np.array_equal(out[b, k].numpy(), want)


@pytest.mark.slow
def test_loader_workers_do_not_hang_after_the_parent_used_opencv_threads(store, tmp_path):
    """A forked worker inherits OpenCV's thread pool mid-flight and hangs in its first OpenCV call
    (seen in cv2.setNumThreads); make_loader's workers start fresh instead."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import cv2, numpy as np, torch
        cv2.setNumThreads(2)
        for _ in range(20):  # the parent's own work spins OpenCV's pool up
            cv2.resize(np.zeros((1024, 1024), np.uint8), (2000, 2000))
        from trainer.data import ClipDataset, EpochSampler, make_loader
        from trainer.streams import INPUTS
        ds = ClipDataset({str(store)!r}, ["down/v_down_train000", "up/v_up_train001"], [0, 1], [(6, 5)] * 2,
                         kind=INPUTS["flow"], crop_size=32, flow_length=3, train=True)
        for batch in make_loader(ds, EpochSampler(2, 2), 2, 2, torch.device("cpu")):
            pass
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
