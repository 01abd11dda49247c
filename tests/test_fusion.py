"""Late fusion and its report, on constructed stream scores (no networks needed)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from trainer.fuse_eval import fuse_eval, scores_path
from twostream.trainer_cli import fuse_eval_command
from trainer.fusion import FusionError, average, choose_weights, svm_features, svm_fuse, weighted
from trainer.svm import svm_fit, svm_predict
from trainer.scores import Scores, save_scores
from twostream.pipeline import validate

# colour x motion classes: the spatial stream knows the colour, the temporal stream the motion.
CLASSES = ["GreenDown", "GreenUp", "RedDown", "RedUp"]
COLOUR = np.array([0, 0, 1, 1])
MOTION = np.array([0, 1, 0, 1])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make(prefix: str, labels: np.ndarray, scores: np.ndarray, classes=CLASSES) -> Scores:
    ids = [f"{classes[y]}/v_{classes[y]}_{prefix}{i:03d}" for i, y in enumerate(labels)]
    return Scores(ids, labels, list(classes), scores)


def complementary(prefix: str, n: int, seed: int) -> tuple[Scores, Scores]:
    """Spatial scores that pick the right colour but guess the motion, temporal the reverse."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    same_colour = COLOUR[None, :] == COLOUR[labels][:, None]
    same_motion = MOTION[None, :] == MOTION[labels][:, None]
    sp = softmax(3.0 * same_colour + rng.normal(0, 0.3, (n, 4)))
    te = softmax(3.0 * same_motion + rng.normal(0, 0.3, (n, 4)))
    return make(prefix, labels, sp), make(prefix, labels, te)


def acc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(scores.argmax(axis=1) == labels))


def write_run(tmp_path, parts: dict[str, tuple[Scores, Scores]], **fusion) -> dict:
    cfg = validate({"out": str(tmp_path / "run"), "fusion": {"methods": ["average", "weighted", "svm"], "weights": [],
                                                             "svm_c": 1.0, **fusion}})
    for part, (sp, te) in parts.items():
        save_scores(scores_path(cfg, "spatial", part), sp)
        save_scores(scores_path(cfg, "temporal", part), te)
    return cfg


def test_complementary_streams_fused_beat_both():
    sp, te = complementary("t", 400, 0)
    fused = average(sp, te)
    assert acc(sp.scores, sp.labels) < 0.7 and acc(te.scores, te.labels) < 0.7  # each only half-knows
    assert acc(fused, sp.labels) > 0.95
    assert acc(weighted([sp, te], (1, 1.5)), sp.labels) > 0.9


def test_identical_streams_fuse_to_themselves():
    sp, _ = complementary("t", 50, 1)
    np.testing.assert_allclose(average(sp, sp), sp.scores, rtol=1e-6)
    np.testing.assert_allclose(weighted([sp, sp], (1, 3)), sp.scores, rtol=1e-6)


def test_mismatched_videos_raise_clear_error():
    sp, te = complementary("t", 20, 2)
    order = np.r_[1, 0, np.arange(2, 20)]
    swapped = Scores([te.video_ids[i] for i in order], te.labels[order], CLASSES, te.scores[order])
    with pytest.raises(FusionError, match="differ at row 0"):
        average(sp, swapped)
    fewer = Scores(te.video_ids[:-1], te.labels[:-1], CLASSES, te.scores[:-1])
    with pytest.raises(FusionError, match="different videos"):
        average(sp, fewer)
    renamed = Scores(te.video_ids, te.labels, CLASSES[::-1], te.scores)
    with pytest.raises(FusionError, match="class lists"):
        average(sp, renamed)
    with pytest.raises(FusionError, match="weights"):
        weighted([sp, te], (0, 0))


def test_weights_stay_even_unless_validation_accuracy_says_otherwise():
    # Both streams right on every validation video: every weighting ties at 100%, and the mean
    # likelihood, higher the more the sharper stream weighs, would pick the end of the grid.
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 16)
    sharp = make("v", labels, softmax(3.0 * np.eye(4)[labels] + rng.normal(0, 0.3, (16, 4))))
    soft = make("v", labels, softmax(1.0 * np.eye(4)[labels] + rng.normal(0, 0.3, (16, 4))))
    assert choose_weights([soft, sharp]) == (1.0, 1.0)
    # One stream wrong on a third of the videos: accuracy decides, and moves the weights.
    wrong = labels.copy()
    wrong[:6] = (labels[:6] + 1) % 4
    noisy = make("v", labels, softmax(3.0 * np.eye(4)[wrong] + rng.normal(0, 0.3, (16, 4))))
    w = choose_weights([noisy, soft])
    assert w[1] > w[0], w


def test_weights_chosen_on_val_only(tmp_path):
    # Validation: temporal reliable, spatial noise -> the weights must favour temporal.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    val_te = softmax(4.0 * np.eye(4)[labels] + rng.normal(0, 1, (60, 4)))
    val_sp = softmax(rng.normal(0, 2, (60, 4)))
    w = choose_weights([make("v", labels, val_sp), make("v", labels, val_te)])
    assert w[1] > w[0]
    assert w == choose_weights([make("v", labels, val_sp), make("v", labels, val_te)])  # deterministic

    # Test set where the opposite holds: chosen weights must not move, whatever the test scores are.
    test_sp, test_te = make("t", labels, val_te), make("t", labels, val_sp)
    cfg = write_run(tmp_path, {"val": (make("v", labels, val_sp), make("v", labels, val_te)),
                               "test": (test_sp, test_te)}, methods=["weighted"])
    first = fuse_eval(cfg, evaluate=False)
    poisoned = make("t", (labels + 1) % 4, softmax(rng.normal(0, 3, (60, 4))))
    second = fuse_eval(cfg, streams_scores={"spatial": {"test": poisoned}, "temporal": {"test": poisoned}},
                       evaluate=False)
    assert first["params"]["weighted"]["weights"] == second["params"]["weighted"]["weights"] == list(w)
    assert first["report"]["params"]["weighted"]["source"] == "chosen on 60 validation videos"


def test_given_weights_need_no_val(tmp_path):
    sp, te = complementary("t", 40, 4)
    cfg = write_run(tmp_path, {"test": (sp, te)}, methods=["weighted"], weights=[1.0, 2.0])
    result = fuse_eval(cfg, evaluate=False)  # would fail if it looked for val scores
    np.testing.assert_allclose(result["report"]["params"]["weighted"]["weights"], [1.0, 2.0])


def test_svm_solves_what_averaging_cannot():
    # The temporal stream confidently predicts the *next* class: averaging follows it and is
    # wrong, a linear SVM learns the mapping from training scores.
    def part(prefix, n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, n)
        te = softmax(5.0 * np.eye(4)[(labels + 1) % 4] + rng.normal(0, 0.5, (n, 4)))
        sp = softmax(rng.normal(0, 0.5, (n, 4)))
        return make(prefix, labels, sp), make(prefix, labels, te)

    train, test = part("tr", 200, 5), part("te", 100, 6)
    assert acc(average(*test), test[0].labels) < 0.1
    fused, model = svm_fuse(train, test, C=1.0)
    assert fused.shape == (100, 4) and acc(fused, test[0].labels) > 0.95
    assert model.weights.shape == (4, 8)


def test_svm_ignores_test_labels_and_refuses_test_videos_in_training():
    train, test = complementary("tr", 200, 7), complementary("te", 80, 8)
    fused, _ = svm_fuse(train, test)
    perm = np.random.default_rng(0).permutation(80)
    relabel = [Scores(s.video_ids, s.labels[perm], CLASSES, s.scores) for s in test]
    fused_relabelled, _ = svm_fuse(train, relabel)
    np.testing.assert_array_equal(fused, fused_relabelled)
    assert acc(fused, test[0].labels) > 0.95
    with pytest.raises(FusionError, match="training and the test"):
        svm_fuse(test, test)


def test_svm_reaches_the_optimum():
    train = complementary("tr", 120, 9)
    x, y = svm_features(*train), train[0].labels
    model = svm_fit(x, y, C=0.5)
    xb = np.c_[x, np.ones(len(x))]

    def objective(w, k):
        m = np.maximum(0, 1 - np.where(y == k, 1.0, -1.0) * (xb @ w))
        return 0.5 * w @ w + 0.5 * m @ m

    rng = np.random.default_rng(0)
    for k in range(4):
        w = np.r_[model.weights[k], model.bias[k]]
        f = objective(w, k)
        assert all(objective(w + 1e-3 * rng.normal(size=w.shape), k) > f for _ in range(20))
    np.testing.assert_array_equal(svm_predict(model, x), svm_predict(svm_fit(x, y, C=0.5), x))  # deterministic


def test_report_is_identical_across_runs(tmp_path):
    parts = {"train": complementary("tr", 80, 10), "val": complementary("va", 40, 11),
             "test": complementary("te", 60, 12)}
    outputs = []
    for run in ("a", "b"):
        cfg = write_run(tmp_path / run, parts)
        result = fuse_eval(cfg, evaluate=False)
        outputs.append({name: result["paths"][name].read_bytes() for name in ("markdown", "json", "confusion")})
    assert outputs[0] == outputs[1]
    report = json.loads(outputs[0]["json"])
    assert [r["method"] for r in report["methods"]] == ["spatial", "temporal", "average", "weighted", "svm"]
    top1 = {r["method"]: r["top1"] for r in report["methods"]}
    assert top1["average"] > max(top1["spatial"], top1["temporal"])
    assert report["best_fusion"] in ("average", "weighted", "svm")
    assert np.sum(report["confusion"]) == 60
    md = outputs[0]["markdown"].decode()
    assert "| average |" in md or "| **average** |" in md
    assert "Classes where the temporal stream wins most" in md
    assert outputs[0]["confusion"][:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_come_from_score_stream_unless_reused(tmp_path, monkeypatch):
    sp, te = complementary("te", 30, 13)
    cfg = write_run(tmp_path, {"test": (sp, te)}, methods=["average"])
    calls = []

    def score_stream(cfg, stream, part):
        calls.append((stream, part))
        return {"spatial": sp, "temporal": te}[stream]

    monkeypatch.setitem(sys.modules, "trainer.evaluate", types.SimpleNamespace(score_stream=score_stream))
    fuse_eval(cfg, reuse_scores=True)
    assert calls == []
    fuse_eval(cfg)  # the validation part too: the best fusion is chosen on it
    assert calls == [("spatial", "test"), ("temporal", "test"), ("spatial", "val"), ("temporal", "val")]
    with pytest.raises(FusionError, match="no spatial scores for the train part"):
        fuse_eval(cfg, methods=["svm"], evaluate=False)


def test_cli_fuses_saved_scores(tmp_path, monkeypatch):
    parts = {"test": complementary("te", 30, 14)}
    cfg = write_run(tmp_path, parts)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'name = "t"\nout = "{cfg["out"]}"\n[fusion]\nmethods = ["average", "weighted"]\n')
    runner = CliRunner()
    res = runner.invoke(fuse_eval_command, ["--pipeline", str(pipeline), "--reuse-scores", "--weights", "1,2"])
    assert res.exit_code == 0, res.output
    assert "weighted" in res.output and (tmp_path / "run" / "fusion" / "report.md").is_file()
    res = runner.invoke(fuse_eval_command, ["--pipeline", str(pipeline), "--reuse-scores", "--weights", "1"])
    assert res.exit_code == 2 and "--weights" in res.output

    def score_stream(cfg, stream, part):
        raise FileNotFoundError(f"no best.pt for the {stream} stream")

    monkeypatch.setitem(sys.modules, "trainer.evaluate", types.SimpleNamespace(score_stream=score_stream))
    res = runner.invoke(fuse_eval_command, ["--pipeline", str(pipeline), "--reuse-scores", "--method", "svm",
                                            "-o", "fusion.svm_c=2.0"])
    assert res.exit_code == 1 and "no best.pt for the spatial stream" in res.output
