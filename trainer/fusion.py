"""Late fusion of two or more streams' class scores (Simonyan & Zisserman 2014, sec. 6).

A fusion method is one entry of METHODS: the parts of the split whose scores it is fitted on
(never the test part), `fit(fitting scores, settings) -> params` and `apply(params, scores)
-> N x C fused scores` (argmax = prediction). Params are plain numbers and arrays, saved with
the report (fusion.pt), so predictions on new videos use exactly what the report measured.
Scores are passed as one `Scores` per stream, in the order of fusion.streams.

* `average`: the streams' softmax scores averaged with equal weights;
* `weighted`: a weighted average, with weights given (fusion.weights) or chosen by
  `choose_weights` on the validation part held out from the training split;
* `svm`: a one-vs-rest linear SVM (`svm_fit` / `svm_predict`) on the L2-normalised
  concatenation of the streams' softmax vectors, trained on the training videos' scores only;
* `calibrated`: each stream's scores calibrated on its own (`_fit_calibration`: matrix scaling
  of its log-probabilities, fitted on the training and validation parts), then averaged:
  averaging alone fails where a stream is confidently wrong between classes it cannot tell
  apart, and a calibrated stream says so (about 50/50 between them);
* `learned`, `feature`, `attention`: small networks (trainer/heads.py) on the concatenated
  log-scores, on the concatenated pooled features, or attention-weighted features, trained on
  the training part's per-video scores / features with the validation part for early stopping.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.atomic import save_atomic, write_json
from trainer.scores import Scores
from trainer.svm import LinearSVM, SVMError, svm_fit, svm_predict

# Ratios tried by `choose_weights` for each stream after the first (whose weight is 1).
RATIOS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


class FusionError(ValueError):
    """Score sets that cannot be fused together; the message says what differs."""


def check_aligned(a: Scores, b: Scores, what: str = "the streams' scores") -> None:
    """Raise FusionError unless a and b cover the same videos in the same order with the same classes."""
    if list(a.class_names) != list(b.class_names):
        raise FusionError(f"{what} have different class lists ({len(a.class_names)} vs {len(b.class_names)} "
                          f"classes); evaluate every stream on the same split and store")
    if len(a.video_ids) != len(b.video_ids):
        raise FusionError(f"{what} cover different videos ({len(a.video_ids)} vs {len(b.video_ids)}); "
                          f"re-evaluate every stream on the same part of the same split")
    for i, (va, vb) in enumerate(zip(a.video_ids, b.video_ids)):
        if va != vb:
            raise FusionError(f"{what} differ at row {i}: video {va!r} vs {vb!r}; "
                              f"re-evaluate every stream on the same part of the same split")
    if not np.array_equal(a.labels, b.labels):
        i = int(np.flatnonzero(a.labels != b.labels)[0])
        raise FusionError(f"{what} disagree on the label of {a.video_ids[i]!r} ({a.labels[i]} vs {b.labels[i]})")


def check_streams(streams: Sequence[Scores], what: str = "the streams' scores") -> None:
    if len(streams) < 2:
        raise FusionError(f"fusion needs at least two streams, got {len(streams)}")
    for s in streams[1:]:
        check_aligned(streams[0], s, what)


def average(*streams: Scores) -> np.ndarray:
    """Equal-weight average of the streams' scores."""
    return weighted(streams, [1.0] * len(streams))


def weighted(streams: Sequence[Scores], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k * scores_k / sum_k w_k; one non-negative weight per stream."""
    check_streams(streams)
    w = _check_weights(weights, len(streams))
    return sum(wk * s.scores.astype(np.float64) for wk, s in zip(w, streams)) / sum(w)


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(v) for v in weights]
    if len(w) != n or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) == 0:
        raise FusionError(f"fusion weights must be {n} non-negative numbers (one per stream), not all 0; "
                          f"got {list(weights)}")
    return w


def weight_grid(n: int) -> list[tuple[float, ...]]:
    """Candidates for `choose_weights`: the first stream at 1 and each other at a ratio of it,
    plus each stream alone."""
    grid = [(1.0, *r) for r in itertools.product(RATIOS, repeat=n - 1)]
    alone = [tuple(1.0 if j == k else 0.0 for j in range(n)) for k in range(n)]
    return alone[:1] + grid + alone[1:]


def choose_weights(val: Sequence[Scores], grid: Sequence[Sequence[float]] | None = None) -> tuple[float, ...]:
    """Pick one weight per stream from `grid` maximising top-1 accuracy on the validation part.

    Ties (common on small validation sets) go to the most even weights, then to the lower mean
    negative log-likelihood of the true class, then to the earlier grid entry, so the choice is
    deterministic: the weights leave the paper's equal weights only when validation accuracy
    asks for it. (The likelihood of a weighted average changes monotonically and by a hair
    across a run of tied weights, so putting it first picks the end of the run, the weighting
    next to where accuracy drops.) Only validation scores are read: the test set never
    influences it.
    """
    check_streams(val, "validation scores")
    labels = val[0].labels
    if len(labels) == 0:
        raise FusionError("the validation part is empty, so fusion weights cannot be chosen; "
                          "set data.val_fraction > 0 or give fusion.weights / --weights")
    grid = weight_grid(len(val)) if grid is None else grid
    best_key, best = None, None
    for k, w in enumerate(grid):
        w = _check_weights(w, len(val))
        fused = weighted(val, w)
        acc = float(np.mean(np.argmax(fused, axis=1) == labels))
        nll = float(-np.mean(np.log(np.clip(fused[np.arange(len(labels)), labels], 1e-12, None))))
        spread = max(abs(math.log((a + 1e-9) / (b + 1e-9))) for a in w for b in w)
        key = (-round(acc, 12), round(spread, 12), round(nll, 12), k)
        if best_key is None or key < best_key:
            best_key, best = key, tuple(w)
    return best


# ---------------------------------------------------------------- SVM fusion (trainer/svm.py)

def svm_features(*streams: Scores) -> np.ndarray:
    """L2-normalised concatenation of the streams' softmax vectors per video (N x kC)."""
    check_streams(streams)
    x = np.concatenate([s.scores for s in streams], axis=1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def svm_fuse(train: Sequence[Scores], test: Sequence[Scores], C: float = 1.0) -> tuple[np.ndarray, LinearSVM]:
    """Fit the SVM on the training videos' scores and return (test decision values, model).

    Refuses training scores that share a video with the test scores, so the test set can
    never leak into the fusion.
    """
    model = _svm_train(train, test, C)
    return svm_predict(model, svm_features(*test)), model


def _svm_train(train: Sequence[Scores], test: Sequence[Scores], C: float) -> LinearSVM:
    check_streams(train, "training scores")
    check_streams(test, "test scores")
    if list(train[0].class_names) != list(test[0].class_names):
        raise FusionError("training and test scores have different class lists; evaluate both parts on the same split")
    overlap = sorted(set(train[0].video_ids) & set(test[0].video_ids))
    if overlap:
        raise FusionError(f"{len(overlap)} videos are in both the training and the test scores (e.g. {overlap[0]!r}); "
                          f"the SVM must be trained on training videos only")
    try:
        return svm_fit(svm_features(*train), train[0].labels, C, num_classes=len(train[0].class_names))
    except SVMError as e:
        raise FusionError(str(e)) from None


# ---------------------------------------------------------------- the methods

@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    fits_on: Callable[[dict], tuple[str, ...]]  # settings -> parts of the split the fit reads
    fit: Callable[[dict, dict, Sequence[Scores]], dict]  # (fitting scores by part, settings, test) -> params
    apply: Callable[[dict, Sequence[Scores]], np.ndarray]


def _fit_weighted(parts: dict, settings: dict, test: Sequence[Scores]) -> dict:
    if settings.get("weights"):
        return {"weights": _check_weights(settings["weights"], len(test)), "source": "given"}
    return {"weights": list(choose_weights(parts["val"])),
            "source": f"chosen on {len(parts['val'][0].video_ids)} validation videos"}


def _inputs(streams: Sequence[Scores], need_features: bool):
    import torch

    logps = [torch.from_numpy(np.log(np.clip(s.scores.astype(np.float64), 1e-8, None))).float() for s in streams]
    feats = None
    if need_features:
        missing = [i for i, s in enumerate(streams) if s.features is None]
        if missing:
            raise FusionError("feature-level fusion needs the streams' pooled features, which these score files lack "
                              "(written by an older version?); run fuse-eval without --reuse-scores")
        feats = [torch.from_numpy(s.features).float() for s in streams]
    return logps, feats, torch.from_numpy(streams[0].labels)


HEAD_DEFAULTS = dict(hidden=128, dropout=0.2, head_epochs=300, head_lr=0.003, head_weight_decay=0.01, patience=30,
                     seed=0)


def train_head(module, fit_inputs, val_inputs=None, settings: dict | None = None, loss=None) -> dict:
    """Full-batch AdamW on (log-scores, features, labels); keeps the state with the best validation
    loss (early stopping) when `val_inputs` are given. `loss(module, x, f, y)`: default the
    cross-entropy of the fused output. Deterministic on the CPU."""
    import torch
    import torch.nn.functional as F

    s = {**HEAD_DEFAULTS, **(settings or {})}
    x, f, y = fit_inputs
    if hasattr(module, "prepare"):
        module.prepare(x, f)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=float(s["head_lr"]),
                            weight_decay=float(s["head_weight_decay"]))
    best, best_nll, since, epoch = None, float("inf"), 0, 0
    for epoch in range(int(s["head_epochs"])):
        module.train()
        opt.zero_grad()
        value = F.cross_entropy(module(x, f), y) if loss is None else loss(module, x, f, y)
        value.backward()
        opt.step()
        if val_inputs is None:
            continue
        module.eval()
        with torch.no_grad():
            nll = float(F.cross_entropy(module(val_inputs[0], val_inputs[1]), val_inputs[2]))
        if nll < best_nll - 1e-6:
            best, best_nll, since = {k: v.detach().clone() for k, v in module.state_dict().items()}, nll, 0
        else:
            since += 1
            if since >= int(s["patience"]):
                break
    if best is not None:
        module.load_state_dict(best)
    module.eval()
    return {"epochs": epoch + 1, "val_nll": None if val_inputs is None else round(best_nll, 6)}


def _fit_head(kind: str):
    """fit() of a fusion trained as a small network on per-video scores or features."""
    def fit(parts: dict, settings: dict, test: Sequence[Scores]) -> dict:
        import torch

        from trainer.heads import FUSIONS, make_fusion

        uses_features = FUSIONS[kind].uses == "features"
        if kind == "calibrated":
            fit_on, val = _joined(parts["train"], parts.get("val")), None
        else:
            fit_on, val = parts["train"], parts.get("val")
            if val is not None and not len(val[0].video_ids):
                val = None
        inputs = _inputs(fit_on, uses_features)
        dims = [t.shape[1] for t in inputs[1]] if inputs[1] is not None else []
        kw = {"hidden": int(settings["hidden"]), "dropout": float(settings["dropout"])}
        torch.manual_seed(int(settings["seed"]))
        module = make_fusion(kind, len(test), len(test[0].class_names), dims, **kw)
        if kind == "calibrated":
            info = _fit_calibration(module, inputs)
        else:
            info = train_head(module, inputs, _inputs(val, uses_features) if val is not None else None, settings)
        return {"module": {"kind": kind, "n": len(test), "num_classes": len(test[0].class_names), "dims": dims,
                           "kw": kw},
                "state": {k: v.numpy() for k, v in module.state_dict().items()},
                "fitted_on": f"{len(fit_on[0].video_ids)} training{' and validation' if kind == 'calibrated' else ''} "
                             f"videos",
                **info}
    return fit


def _joined(train: Sequence[Scores], val: Sequence[Scores] | None) -> list[Scores]:
    """Each stream's training and validation scores as one set (the validation part may be absent)."""
    if not val or not len(val[0].video_ids):
        return list(train)
    return [Scores([*a.video_ids, *b.video_ids], np.concatenate([a.labels, b.labels]), a.class_names,
                   np.concatenate([a.scores, b.scores])) for a, b in zip(train, val)]


# Pulls each stream's calibration towards no change (W = I, b = 0), per entry, so the pull does
# not depend on the number of classes.
CALIBRATION_L2 = 0.1


def _fit_calibration(module, inputs) -> dict:
    """Each stream calibrated on its own, by its own NLL (not tuned for the fused output) on
    every video outside the test part: the validation part alone (16 videos in the demo) is far
    too few for a matrix per stream. What averaging needs is that a stream which cannot tell two
    classes apart says about 50/50 between them, while a stream averaged over 25 test samples is
    underconfident about what it does know; one temperature can fix only one of the two, a
    matrix both. A small convex problem: L-BFGS to convergence, deterministic."""
    import torch
    import torch.nn.functional as F

    x, _, y = inputs
    eye = torch.eye(module.weight.shape[-1])
    opt = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(F.nll_loss(c, y) for c in module.calibrate(x)) / len(x)
        loss = loss + CALIBRATION_L2 * ((module.weight - eye).square().mean() + module.bias.square().mean())
        loss.backward()
        return loss

    opt.step(closure)
    module.eval()
    with torch.no_grad():
        after = [float(F.nll_loss(c, y)) for c in module.calibrate(x)]
    return {"nll_before": [round(float(F.nll_loss(torch.log_softmax(z, -1), y)), 4) for z in x],
            "nll_after": [round(v, 4) for v in after]}


def _apply_head(params: dict, streams: Sequence[Scores]) -> np.ndarray:
    import torch

    from trainer.heads import FUSIONS, fusion_module

    kind = params["module"]["kind"]
    module = fusion_module(kind, params, len(streams))
    x, f, _ = _inputs(streams, FUSIONS[kind].uses == "features")
    with torch.no_grad():
        return torch.softmax(module(x, f), -1).double().numpy()


def _fit_svm(parts: dict, settings: dict, test: Sequence[Scores]) -> dict:
    m = _svm_train(parts["train"], test, float(settings.get("svm_c", 1.0)))
    return {"weights": m.weights, "bias": m.bias, "C": m.C, "train_videos": len(parts["train"][0].video_ids)}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("average", "equal-weight average of the softmax scores", lambda s: (), lambda parts, s, t: {},
           lambda p, streams: average(*streams)),
    Method("weighted", "weighted average; weights given or chosen on the validation part",
           lambda s: () if s.get("weights") else ("val",), _fit_weighted,
           lambda p, streams: weighted(streams, p["weights"])),
    Method("svm", "linear SVM on the L2-normalised concatenated softmax scores (training part)",
           lambda s: ("train",), _fit_svm,
           lambda p, streams: svm_predict(LinearSVM(p["weights"], p["bias"], p["C"]), svm_features(*streams))),
    Method("calibrated", "average of the scores, each stream calibrated first (matrix scaling, training and "
           "validation parts)", lambda s: ("train", "val"), _fit_head("calibrated"), _apply_head),
    Method("learned", "an MLP on the concatenated log-scores (training part, validation for early stopping)",
           lambda s: ("train", "val"), _fit_head("learned"), _apply_head),
    Method("feature", "an MLP on the concatenated pooled features (feature-level fusion)",
           lambda s: ("train", "val"), _fit_head("feature"), _apply_head),
    Method("attention", "per-video attention weights over the streams' pooled features",
           lambda s: ("train", "val"), _fit_head("attention"), _apply_head),
)}


# ---------------------------------------------------------------- fusion.pt

def _tensors(obj):
    """Fitted parameters as torch tensors and primitives (torch.load(weights_only=True) reads them)."""
    import torch

    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


def describe(obj):
    """Fitted parameters for people: small arrays as rounded lists, large ones by their shape."""
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.round(6).tolist() if obj.size <= 64 else f"array {list(obj.shape)}"
    return obj


def save_fitted(out_dir: Path, fitted: dict) -> dict[str, Path]:
    """fusion.pt (every fitted method's parameters, for predictions on new videos; loads with
    weights_only=True) and fusion.json (the same for people)."""
    import torch

    return {"fusion": save_atomic(out_dir / "fusion.pt", lambda p: torch.save(_tensors(fitted), p)),
            "fusion_json": write_json(out_dir / "fusion.json", describe(fitted))}


def _numpy(obj):
    import torch

    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, list):
        return [_numpy(v) for v in obj]
    return obj


def load_fitted(path) -> dict:
    """fusion.pt (written by fuse-eval) with its parameters back as numpy arrays."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FusionError(f"no fitted fusion at {path}; run `python -m twostream fuse-eval` first")
    return _numpy(torch.load(path, map_location="cpu", weights_only=True))


def fuse(fitted: dict, method: str, streams: Sequence[Scores]) -> np.ndarray:
    """Apply a fitted method (from fusion.pt) to new scores, exactly as the report measured it."""
    if method not in fitted["params"]:
        raise FusionError(f"fusion {method!r} was not fitted; fitted: {', '.join(fitted['params'])}")
    check_streams(streams)
    return METHODS[method].apply(fitted["params"][method], streams)


def network_from_run(out: str | Path, fusion: str | None = None, streams: Sequence[str] | None = None):
    """A run's trained streams (best.pt) with the fusion fuse-eval fitted (fusion/fusion.pt; default:
    the best fusion it chose on the validation part), as one TwoStreamNetwork."""
    from trainer.checkpoint import load_best
    from trainer.heads import fusion_module
    from trainer.network import TwoStreamNetwork

    fitted = load_fitted(Path(out) / "fusion" / "fusion.pt")
    names = list(streams or fitted["streams"])
    method = fusion or fitted["best"] or "average"
    cks = [load_best(out, n) for n in names]
    return TwoStreamNetwork.from_checkpoints(cks, fusion_module(method, fitted["params"].get(method, {}), len(names)))
