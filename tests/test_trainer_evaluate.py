import numpy as np
import pytest
import torch

from twostream.schema import ConfigError
from trainer.data import ProtocolDataset
from trainer.evaluate import score_stream
from trainer.scores import load_scores
from trainer.streams import INPUTS
from trainer.train import main
from trainer_toy import make_toy, toy_config


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
    cfg = {**cfg, "eval": {"segments": 25, "crops": crops, "batch_size": 16}}
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
