import numpy as np
import pytest
import torch

from core.schema import ConfigError
from trainer.data import ProtocolDataset
from trainer.evaluate import score_stream
from trainer.scores import load_scores
from trainer.streams import INPUTS
from trainer.train import main
from trainer_toy import make_toy, toy_config
from twostream.pipeline import validate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A temporal model trained for one epoch (its quality does not matter here)."""
    root = tmp_path_factory.mktemp("eval")
    store, splits = make_toy(root, "hdf5", train_per_class=5, test_per_class=3, frames=5)
    cfg = toy_config(root, store, splits, epochs=1)
    main(cfg, "temporal")
    return root, store, splits, cfg


@pytest.mark.parametrize("crops", ["center", "ten"])
def test_score_stream_writes_averaged_softmax_per_video(trained, crops):
    root, _, _, cfg = trained
    cfg = validate({**cfg, "eval": {"segments": 25, "crops": crops, "batch_size": 16}})
    s = score_stream(cfg, "temporal", "test", show=False)
    assert len(s.video_ids) == 6 and s.class_names == ["down", "up"] and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.allclose(s.scores.sum(1), 1, atol=1e-5) and (s.scores >= 0).all()
    saved = load_scores(root / "run/temporal/scores_test.npz")
    assert saved.video_ids == s.video_ids and np.allclose(saved.scores, s.scores)


def test_score_stream_needs_a_trained_model(tmp_path, trained):
    _, store, splits, _ = trained
    with pytest.raises(ConfigError, match="no trained spatial model"):
        score_stream(toy_config(tmp_path, store, splits), "spatial", "test")


def test_protocol_items_are_25_evenly_spaced_stacks_in_ten_crops(trained):
    _, store, _, _ = trained
    # 5 frames = 4 flows; L = 3 gives 2 stack starts (0 and 1) spread over 25 samples.
    ds = ProtocolDataset(store, ["up/v_up_test000"], [1], [(5, 4)], kind=INPUTS["flow"], crop_size=32,
                         flow_length=3, samples=25, crops="ten")
    assert len(ds) == 25
    x, j = ds[0]
    assert x.shape == (10, 6, 32, 32) and x.dtype == torch.uint8 and j == 0
    plain, mirrored = x[:5], x[5:]
    assert torch.equal(mirrored[:, 0::2], 255 - plain[:, 0::2].flip(-1))  # flow x negated on mirrors
    assert torch.equal(mirrored[:, 1::2], plain[:, 1::2].flip(-1))
    first, last = ds[0][0], ds[24][0]
    assert torch.equal(first[4, 2:], last[4, :4])  # stack at flow 1 = stack at flow 0 shifted by one flow


class Probe(torch.nn.Module):
    """Logits from left-right weighted channel means (so mirrors count) and plain means: every crop,
    mirror and position gives a different softmax."""

    def forward(self, x):
        r = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
        lr, m = (x * r).mean(dim=(2, 3)), x.mean(dim=(2, 3))
        return torch.stack([lr[:, 0] * 3, m[:, 1] * 2 - 1 + lr[:, 1], lr.sum(1)], 1)


@pytest.mark.parametrize("mean_subtraction", [True, False])
def test_protocol_average_equals_a_hand_computation(tmp_path, mean_subtraction):
    """25 evenly spaced stacks x 10 crops, softmax averaged: recomputed here without the loader."""
    from flowprep.store import Store, open_writer
    from flowprep.store_files import write_store_info
    from trainer.evaluate import predict
    from trainer.data import make_loader

    rng = np.random.default_rng(0)
    h, w, n, L = 40, 52, 12, 3
    write_store_info(tmp_path, {"format": "jpeg", "bound": 20.0})
    with open_writer("jpeg", tmp_path, "a/v", jpeg_quality=100) as wr:
        for _ in range(n):
            wr.write_rgb(np.zeros((h, w, 3), np.uint8))
        for _ in range(n - 1):
            wr.write_flow(rng.integers(0, 256, (h, w, 2), dtype=np.uint8))
        wr.commit({"bound": 20.0})
    kind, crop = INPUTS["flow"], 35  # eval short side round(35 * 256 / 224) = 40 = h: no resize
    ds = ProtocolDataset(tmp_path, ["a/v"], [0], [(n, n - 1)], kind=kind, crop_size=crop, flow_length=L,
                         samples=25, crops="ten")
    probs, _ = predict(Probe(), make_loader(ds, range(len(ds)), 7, 0, torch.device("cpu")), torch.device("cpu"),
                       kind, L, mean_subtraction, 1, 3, show=False)

    with Store(tmp_path).open("a/v") as v:
        flows = [v.flow(i).astype(np.float64) for i in range(n - 1)]
    starts = np.round(np.linspace(0, (n - 1) - L, 25)).astype(int)  # 25 evenly spaced stack starts
    boxes = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]
    total = np.zeros(3)
    for t in starts:
        stack = np.concatenate(flows[t:t + L], -1)  # x1, y1, x2, y2, ...
        for mirror in (False, True):
            for y, x in boxes:
                c = stack[y:y + crop, x:x + crop].copy()
                if mirror:
                    c = c[:, ::-1]
                    c[..., 0::2] = 255 - c[..., 0::2]
                f = (c - 127.5) / (255 * 0.226)
                if mean_subtraction:
                    f -= f.mean(axis=(0, 1))  # per flow field
                r = np.linspace(-1, 1, crop)[None, :, None]
                lr, m = (f * r).mean(axis=(0, 1)), f.mean(axis=(0, 1))
                z = np.array([lr[0] * 3, m[1] * 2 - 1 + lr[1], lr.sum()])
                total += np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(probs[0], total / 250, rtol=1e-5, atol=1e-6)
