"""Joint fine-tuning of the streams under the fused loss, and multi-task training over two datasets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluate import score_stream
from trainer.fuse_eval import fuse_eval
from trainer.train import main as train
from trainer.joint import score_joint, train_joint
from trainer_toy import kill_in_second_epoch, log_without_speed, make_toy, toy_config, toy_raw
from twostream.pipeline import validate
from core.schema import ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both streams trained briefly on a toy where appearance and motion both tell the class."""
    root = tmp_path_factory.mktemp("joint")
    store, splits = make_toy(root, "jpeg", train_per_class=10, test_per_class=4, frames=6, tint=True)
    cfg = toy_config(root, store, splits, epochs=1, optimizer="adamw", lr=1e-3)
    for stream in ("spatial", "temporal"):
        train(cfg, stream)
    return root, cfg


@pytest.mark.slow
def test_joint_training_lowers_the_fused_loss_and_is_reported(trained):
    root, cfg = trained
    cfg = validate({**cfg, "fusion": {"methods": ["average", "attention"]}, "joint": {"epochs": 3, "lr": 3e-4}})
    fuse_eval(cfg)  # fits the heads the joint run starts from
    summary = train_joint(cfg, "attention")
    losses = [r["train_loss"] for r in summary["log"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    ck = torch.load(root / "run" / "joint_attention" / "best.pt", weights_only=True)
    assert ck["fusion"] == "attention" and ck["streams"] == ["spatial", "temporal"]
    s = score_joint(cfg, "attention", "test", show=False)
    assert len(s.video_ids) == 8 and np.allclose(s.scores.sum(1), 1, atol=1e-5)
    report = fuse_eval(cfg, reuse_scores=True)["report"]
    assert "attention (joint)" in [r["method"] for r in report["methods"]]


@pytest.mark.slow
def test_joint_resume_after_a_kill_mid_epoch_equals_an_uninterrupted_run(trained, tmp_path, monkeypatch):
    """Joint training shares the streams' loop (trainer/fit.py): killed two steps into its second
    epoch and resumed with joint.resume, it ends with the weights and log of a run never killed."""
    root, cfg = trained
    settings = {"fusion": {"methods": ["attention"]}, "joint": {"epochs": 2, "lr": 3e-4, "dropout": 0.5}}
    straight = validate({**cfg, **settings, "out": str(tmp_path / "a")})
    cut = validate({**cfg, **settings, "out": str(tmp_path / "b")})
    for run in (straight, cut):  # the trained streams, copied: each run starts from the same ones
        for stream in ("spatial", "temporal"):
            (tmp_path / run["out"] / stream).mkdir(parents=True)
            for name in ("best.pt", "last.pt", "log.jsonl"):
                (tmp_path / run["out"] / stream / name).write_bytes((root / "run" / stream / name).read_bytes())
    train_joint(straight, "attention")

    kill_in_second_epoch(monkeypatch, lambda: train_joint(cut, "attention"))
    summary = train_joint(validate({**cut, "joint": {**settings["joint"], "resume": True}}), "attention")
    assert [r["epoch"] for r in summary["log"]] == [1, 2]
    a, b = (torch.load(tmp_path / d / "joint_attention" / "last.pt", weights_only=True)["model"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_without_speed(tmp_path / "a/joint_attention/log.jsonl") == \
        log_without_speed(tmp_path / "b/joint_attention/log.jsonl")


@pytest.mark.slow
def test_multitask_heads_each_learn_their_own_dataset(tmp_path):
    a_store, a_splits = make_toy(tmp_path / "a", "jpeg", train_per_class=16, test_per_class=10, frames=6,
                                 classes=("down", "up"), square=20)
    b_store, b_splits = make_toy(tmp_path / "b", "hdf5", train_per_class=16, test_per_class=10, frames=6,
                                 classes=("fall", "rise"), seed=1, square=20)
    cfg = toy_raw(tmp_path, a_store, a_splits, epochs=6, lr=0.01)  # 4 left BatchNorm's val statistics behind
    cfg["datasets"] = {"a": {"store": str(a_store), "split_format": "list", "splits": str(a_splits),
                             "val_fraction": 0.2},
                       "b": {"store": str(b_store), "split_format": "list", "splits": str(b_splits),
                             "val_fraction": 0.2}}
    cfg["temporal"]["datasets"] = ["a", "b"]
    raw, cfg = cfg, validate(cfg)  # the pipeline with [datasets.*] sections is valid
    train(cfg, "temporal")
    ck = torch.load(tmp_path / "run" / "temporal" / "best.pt", weights_only=True)
    assert ck["class_names"] == ["a/down", "a/up", "b/fall", "b/rise"]
    assert [t["name"] for t in ck["tasks"]] == ["a", "b"]
    acc = {}
    for ds in ("a", "b"):
        s = score_stream(cfg, "temporal", "test", show=False, dataset=ds)
        assert s.class_names == (["down", "up"] if ds == "a" else ["fall", "rise"])
        acc[ds] = float(np.mean(s.scores.argmax(1) == s.labels))
        assert (tmp_path / "run" / "temporal" / f"scores_{ds}_test.npz").is_file()
    assert min(acc.values()) >= 0.8, acc  # one backbone, two heads, each right on its own dataset
    with pytest.raises(ConfigError, match="say which"):
        score_stream(cfg, "temporal", "test", show=False)
    with pytest.raises(ConfigError, match=r"\[datasets.c\]"):
        train(validate({**raw, "temporal": {**raw["temporal"], "datasets": ["a", "c"]}}), "temporal")
