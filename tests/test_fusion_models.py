"""Fusion as models: TwoStreamNetwork's fusions, learned weights and attention on toys where the
right answer is known, fitted fusions that round-trip through fusion.pt, and refused split mixes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.fuse_eval import fuse_eval, scores_path
from trainer.fusion import FusionError, METHODS, fuse, load_fitted, train_head, weight_grid, weighted
from trainer.heads import FUSIONS, WeightedFusion, fusion_module
from trainer.network import TwoStreamNetwork
from trainer.scores import Scores, load_scores, save_scores
from core.splits import SplitError, read_split, split_identity
from twostream.pipeline import validate

C = 4


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def scores(prefix, labels, probs, feats=None, meta=None):
    ids = [f"c{y}/v_{prefix}{i:03d}" for i, y in enumerate(labels)]
    return Scores(ids, labels, [f"c{k}" for k in range(C)], probs, meta or {}, feats)


@pytest.mark.parametrize("kind", list(FUSIONS))
def test_every_fusion_gives_logits_and_gradients_to_both_streams(kind):
    torch.manual_seed(0)
    net = TwoStreamNetwork(num_classes=5, fusion=kind, flow_length=2)
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    flow = torch.randint(0, 256, (3, 4, 32, 32), dtype=torch.uint8)
    out, alpha = net(rgb, flow, return_alpha=True)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    for stream in net.streams:
        assert stream.net.conv1.weight.grad.abs().sum() > 0  # the fused loss reaches every backbone
    trainable = [p for p in net.fusion.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    if kind == "attention":
        assert alpha.shape == (3, 2) and torch.allclose(alpha.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="2 streams"):
        net(rgb)


def test_learnable_weight_moves_to_the_informative_stream():
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 300)
    informative = softmax(4 * np.eye(C)[y] + rng.normal(0, 1, (300, C)))
    noise = softmax(rng.normal(0, 2, (300, C)))
    logps = [torch.log(torch.from_numpy(p).float()) for p in (noise, informative)]
    module = WeightedFusion(2, learnable=True)
    assert torch.allclose(module.weights(), torch.tensor([0.5, 0.5]))
    train_head(module, (logps, None, torch.from_numpy(y)), settings={"head_epochs": 200, "head_lr": 0.05,
                                                                     "head_weight_decay": 0.0})
    w = module.weights()
    assert w[1] > 0.85, w  # the noise stream is all but switched off


def attention_toy(n, seed):
    """In each video one stream (chosen at random) knows the class and says so confidently; the
    other is confidently wrong. Its features carry the class and a marker of reliability."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    good = rng.integers(0, 2, n)
    wrong = (y + rng.integers(1, C, n)) % C
    probs, feats = [], []
    for k in range(2):
        know = good == k
        label = np.where(know, y, wrong)
        probs.append(softmax(4 * np.eye(C)[label] + rng.normal(0, 0.3, (n, C))))
        signal = np.where(know[:, None], 2 * np.eye(C)[y], 0) + rng.normal(0, 0.5, (n, C))
        feats.append(np.c_[signal, know[:, None] * 2.0 + rng.normal(0, 0.3, (n, 1)), rng.normal(0, 1, (n, 3))])
    return [scores(f"s{seed}", y, p, f) for p, f in zip(probs, feats)], good


def test_attention_weights_differ_per_video_and_beat_every_fixed_weight():
    train, _ = attention_toy(400, 1)
    val, _ = attention_toy(100, 2)
    test, good = attention_toy(300, 3)
    y = test[0].labels
    fixed = max(np.mean(weighted(test, w).argmax(1) == y) for w in weight_grid(2))  # best fixed weight, even on test
    settings = {**validate({})["fusion"]}
    params = METHODS["attention"].fit({"train": train, "val": val}, settings, test)
    acc = np.mean(METHODS["attention"].apply(params, test).argmax(1) == y)
    assert fixed < 0.65 and acc > 0.9, (fixed, acc)
    module = fusion_module("attention", params, 2)
    alpha = module.alpha([torch.from_numpy(s.features).float() for s in test])[:, 0].detach().numpy()
    assert alpha.std() > 0.2  # per video, not one weight for all (measured 0.25)
    assert alpha[good == 0].mean() - alpha[good == 1].mean() > 0.3  # it trusts the stream that knows (0.72 vs 0.26)
    assert np.mean((alpha > 0.5) == (good == 0)) > 0.9  # measured 0.97


def complementary(prefix, n, seed, dim=6):
    """Spatial knows one half of the class (colour), temporal the other (motion); features likewise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    colour, motion = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    sp = softmax(3.0 * (colour[None] == colour[y][:, None]) + rng.normal(0, 0.3, (n, C)))
    te = softmax(3.0 * (motion[None] == motion[y][:, None]) + rng.normal(0, 0.3, (n, C)))
    fs = np.c_[colour[y][:, None] * 2.0, rng.normal(0, 0.5, (n, dim))]
    ft = np.c_[motion[y][:, None] * 2.0, rng.normal(0, 0.5, (n, dim))]
    return scores(prefix, y, sp, fs), scores(prefix, y, te, ft)


def run_cfg(tmp_path, parts, **fusion):
    cfg = validate({"out": str(tmp_path / "run"), "fusion": fusion})
    for part, pair in parts.items():
        for stream, s in zip(("spatial", "temporal"), pair):
            save_scores(scores_path(cfg, stream, part), s)
    return cfg


def test_every_method_side_by_side_and_fusion_pt_round_trip(tmp_path):
    parts = {"train": complementary("tr", 200, 10), "val": complementary("va", 80, 11),
             "test": complementary("te", 120, 12)}
    cfg = run_cfg(tmp_path, parts)
    result = fuse_eval(cfg, evaluate=False)
    top1 = {r["method"]: r["top1"] for r in result["report"]["methods"]}
    assert max(top1["spatial"], top1["temporal"]) < 0.7
    for m in ("average", "calibrated", "svm", "learned", "feature", "attention"):
        assert top1[m] > 0.9, (m, top1)
    assert result["report"]["best_fusion"] in METHODS and result["report"]["best_chosen_on"] == "validation"
    fitted = load_fitted(tmp_path / "run" / "fusion" / "fusion.pt")  # torch.load(weights_only=True) inside
    test = [load_scores(scores_path(cfg, s, "test")) for s in ("spatial", "temporal")]  # features as stored
    for m in fitted["methods"]:
        again = fuse(fitted, m, test)
        saved = np.load(tmp_path / "run" / "fusion" / f"scores_{m}.npz")["scores"]
        np.testing.assert_array_equal(again.argmax(1), saved.argmax(1))
        np.testing.assert_allclose(again, saved, rtol=1e-6, atol=1e-7)


def shifted(prefix, n, seed):
    """The temporal stream confidently names the next class: averaging follows it, an SVM learns the map."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    te = softmax(5.0 * np.eye(C)[(y + 1) % C] + rng.normal(0, 0.5, (n, C)))
    return scores(prefix, y, softmax(rng.normal(0, 0.5, (n, C)))), scores(prefix, y, te)


def test_best_fusion_is_chosen_on_validation_not_test(tmp_path):
    # On train and val the SVM wins; on test averaging would. The report must pick the SVM.
    parts = {"train": shifted("tr", 200, 20), "val": shifted("va", 80, 21), "test": complementary("te", 120, 22)}
    cfg = run_cfg(tmp_path, parts, methods=["average", "svm"])
    report = fuse_eval(cfg, evaluate=False)["report"]
    top1 = {r["method"]: r["top1"] for r in report["methods"]}
    val = {r["method"]: r.get("val_top1") for r in report["methods"]}
    assert top1["average"] > top1["svm"] and val["svm"] > val["average"], (top1, val)
    assert report["best_fusion"] == "svm" and report["best_chosen_on"] == "validation"


def overconfident(prefix, n, seed):
    """Each stream knows half of the class and picks one of the two look-alikes confidently at random."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    out = []
    for known in (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])):
        same = known[None] == known[y][:, None]
        other = np.array([np.flatnonzero(same[i] & (np.arange(C) != y[i]))[0] for i in range(n)])
        pick = np.where(rng.random(n) < 0.5, y, other)
        out.append(scores(prefix, y, softmax(3.0 * np.eye(C)[pick] + 6.0 * same + rng.normal(0, 0.3, (n, C)))))
    return out


def lookalike(prefix, n, seed):
    """The demo's streams: each knows half of the class (colour / motion) but is underconfident about
    it (the test protocol averages 25 samples), and between its two look-alikes it leans one way or
    the other by a margin that differs from video to video."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    out = []
    for known in (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])):
        same = known[None] == known[y][:, None]
        partner = np.array([np.flatnonzero(same[i] & (np.arange(C) != y[i]))[0] for i in range(n)])
        z = 1.5 * same + rng.normal(0, 0.3, (n, C))
        lean = rng.normal(0, 1.5, n)
        z[np.arange(n), y] += lean / 2
        z[np.arange(n), partner] -= lean / 2
        out.append(scores(prefix, y, softmax(z)))
    return out


@pytest.mark.parametrize("toy", [lookalike, overconfident])
def test_calibration_learns_what_each_stream_cannot_tell_apart(toy):
    """Averaging fails where both streams lean the wrong way between their look-alikes. Calibrated,
    each stream says about 50/50 between the two classes it cannot separate and is sure of the half
    it knows; averaged, that is right. Fitted on 80 training + 16 validation videos (the demo's
    sizes), checked on 400 others."""
    train, val, test = toy("tr", 80, 10), toy("va", 16, 11), toy("te", 400, 12)
    settings = validate({})["fusion"]
    params = METHODS["calibrated"].fit({"train": train, "val": val}, settings, test)
    assert params["fitted_on"] == "96 training and validation videos"
    y = test[0].labels
    fitted = {"average": METHODS["average"].fit({"train": train, "val": val}, settings, test), "calibrated": params}
    acc = {m: np.mean(METHODS[m].apply(p, test).argmax(1) == y) for m, p in fitted.items()}
    assert acc["average"] < 0.75 and acc["calibrated"] > 0.95, acc  # measured 0.57 / 0.975 and 0.695 / 0.995
    if toy is lookalike:  # no temperature would do: the best one, even chosen on the test videos, stays below 0.75
        best_t = max(np.mean(sum(softmax(np.log(s.scores) / t) for s in test).argmax(1) == y)
                     for t in (0.5, 1, 2, 4, 8))
        assert best_t < 0.75, best_t  # measured 0.69
    module = fusion_module("calibrated", params, 2)
    i = np.arange(len(y))
    for k, known in enumerate((np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))):
        partner = np.array([[j for j in range(C) if j != c and known[j] == known[c]][0] for c in range(C)])[y]
        logp = torch.log(torch.from_numpy(test[k].scores))
        with torch.no_grad():
            cal = module.calibrate([logp] * 2)[k].exp().double().numpy()
        before = test[k].scores.astype(np.float64)
        lean = {n: np.mean(np.abs(q[i, y] / (q[i, y] + q[i, partner]) - 0.5)) for n, q in (("before", before),
                                                                                            ("after", cal))}
        assert lean["before"] > 0.2 and lean["after"] < 0.1, lean  # measured 0.25 -> 0.07, 0.45 -> 0.07
        assert np.mean(cal[i, y] + cal[i, partner]) > 0.95  # and sure of the half it knows (0.85 -> 0.98)
        nll = {n: -np.mean(np.log(q[i, y])) for n, q in (("before", before), ("after", cal))}
        assert nll["after"] < 0.75 and nll["after"] < 0.8 * nll["before"], nll  # near ln 2 on unseen videos


def test_calibration_of_an_older_fusion_pt_still_loads():
    """fusion.pt written before matrix scaling held a temperature per stream (log_t): W = I / T."""
    old = {"module": {"kind": "calibrated", "n": 2, "num_classes": C, "dims": [], "kw": {}},
           "state": {"log_t": np.log(np.array([2.0, 0.5], np.float32)), "bias": np.zeros((2, C), np.float32)}}
    module = fusion_module("calibrated", old, 2)
    z = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0, 0.5]]), -1)
    for k, t in enumerate((2.0, 0.5)):
        torch.testing.assert_close(module.calibrate([z, z])[k], torch.log_softmax(z / t, -1))


def test_reused_scores_from_another_split_are_refused(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("".join(f"c{i % C}/v_tr{i:03d}.avi {i % C}\n" for i in range(40)))
    (splits / "test.txt").write_text("".join(f"c{i % C}/v_te{i:03d}.avi {i % C}\n" for i in range(8)))
    data = {"split_format": "list", "splits": str(splits), "val_fraction": 0.2}
    other = split_identity(read_split("list", splits, 1, 0.2), {"data": data})
    now = {**data, "val_fraction": 0.1}
    parts = {"test": complementary("te", 8, 30)}
    cfg = validate({"out": str(tmp_path / "run"), "data": now, "fusion": {"methods": ["average"]}})
    for stream, s in zip(("spatial", "temporal"), parts["test"]):
        s.meta = {"split": other}
        save_scores(scores_path(cfg, stream, "test"), s)
    with pytest.raises(SplitError, match=r"val_fraction 0.2.*now asks for.*val_fraction 0.1"):
        fuse_eval(cfg, evaluate=False, reuse_scores=True)


def test_feature_fusion_needs_features():
    sp, te = complementary("te", 10, 40)
    sp.features = None
    with pytest.raises(FusionError, match="pooled features"):
        METHODS["feature"].fit({"train": [sp, te], "val": [sp, te]}, validate({})["fusion"], [sp, te])
