"""The point of the temporal stream: it sees motion that single frames do not show."""
import pytest

from trainer.evaluate import score_stream
from trainer.train import main
from trainer_toy import make_toy, toy_config


@pytest.fixture(scope="module")
def motion_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    store, splits = make_toy(root, "jpeg", train_per_class=16, test_per_class=20, frames=6, square=20, speed=3)
    return root, store, splits


def accuracy(s) -> float:
    return float((s.scores.argmax(1) == s.labels).mean())


@pytest.mark.slow
def test_temporal_stream_learns_up_vs_down_and_spatial_cannot(motion_only):
    root, store, splits = motion_only
    cfg = toy_config(root, store, splits, epochs=4, lr=0.01)
    main(cfg, "temporal")
    main(cfg, "spatial")
    temporal = accuracy(score_stream(cfg, "temporal", "test", show=False))
    spatial = accuracy(score_stream(cfg, "spatial", "test", show=False))
    print(f"motion-only test accuracy: temporal {temporal:.2f}, spatial {spatial:.2f} (40 videos, chance 0.5)")
    assert temporal >= 0.85
    assert spatial <= 0.7
