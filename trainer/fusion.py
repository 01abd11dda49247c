"""Late fusion of the spatial and temporal streams' class scores (Simonyan & Zisserman 2014, sec. 6).

Three methods, each returning an N x C fused score matrix (argmax = prediction):
* `average`: the two softmax score vectors averaged 1:1;
* `weighted`: a weighted average, with weights given or chosen by `choose_weights` on the
  validation part held out from the training split (never on the test set);
* SVM: a one-vs-rest linear SVM (`svm_fit` / `svm_predict`) on the L2-normalised
  concatenation of the two softmax vectors, trained on the training videos' scores only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer.scores import Scores

# Temporal:spatial ratios tried by `choose_weights` (spatial weight 1), plus temporal alone.
DEFAULT_GRID: tuple[tuple[float, float], ...] = (
    ((1.0, 0.0),) + tuple((1.0, r) for r in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)) + ((0.0, 1.0),))


class FusionError(ValueError):
    """Score sets that cannot be fused together; the message says what differs."""


def check_aligned(a: Scores, b: Scores, what: str = "spatial and temporal scores") -> None:
    """Raise FusionError unless a and b cover the same videos in the same order with the same classes."""
    if list(a.class_names) != list(b.class_names):
        raise FusionError(f"{what} have different class lists ({len(a.class_names)} vs {len(b.class_names)} "
                          f"classes); evaluate both streams on the same split and store")
    if len(a.video_ids) != len(b.video_ids):
        raise FusionError(f"{what} cover different videos ({len(a.video_ids)} vs {len(b.video_ids)}); "
                          f"re-evaluate both streams on the same part of the same split")
    for i, (va, vb) in enumerate(zip(a.video_ids, b.video_ids)):
        if va != vb:
            raise FusionError(f"{what} differ at row {i}: video {va!r} vs {vb!r}; "
                              f"re-evaluate both streams on the same part of the same split")
    if not np.array_equal(a.labels, b.labels):
        i = int(np.flatnonzero(a.labels != b.labels)[0])
        raise FusionError(f"{what} disagree on the label of {a.video_ids[i]!r} ({a.labels[i]} vs {b.labels[i]})")


def average(s_spatial: Scores, s_temporal: Scores) -> np.ndarray:
    """1:1 average of the two streams' scores."""
    return weighted(s_spatial, s_temporal, (1.0, 1.0))


def weighted(s_spatial: Scores, s_temporal: Scores, weights: Sequence[float]) -> np.ndarray:
    """(w_s * spatial + w_t * temporal) / (w_s + w_t); weights = (w_s, w_t), non-negative."""
    check_aligned(s_spatial, s_temporal)
    ws, wt = _check_weights(weights)
    return ((ws * s_spatial.scores.astype(np.float64) + wt * s_temporal.scores.astype(np.float64))
            / (ws + wt))


def _check_weights(weights: Sequence[float]) -> tuple[float, float]:
    w = [float(v) for v in weights]
    if len(w) != 2 or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) == 0:
        raise FusionError(f"fusion weights must be two non-negative numbers [spatial, temporal], not both 0; "
                          f"got {list(weights)}")
    return w[0], w[1]


def choose_weights(val_spatial: Scores, val_temporal: Scores, labels: np.ndarray | None = None,
                   grid: Sequence[Sequence[float]] | None = None) -> tuple[float, float]:
    """Pick (w_s, w_t) from `grid` maximising top-1 accuracy on the validation part.

    Ties (common on small validation sets) go to the lower mean negative log-likelihood of the
    true class, then to the ratio closest to 1:1, then to the earlier grid entry, so the choice
    is deterministic. Only validation scores are read: the test set never influences it.
    """
    check_aligned(val_spatial, val_temporal, "validation spatial and temporal scores")
    labels = val_spatial.labels if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (len(val_spatial.video_ids),):
        raise FusionError(f"{labels.shape[0]} labels for {len(val_spatial.video_ids)} validation videos")
    if len(labels) == 0:
        raise FusionError("the validation part is empty, so fusion weights cannot be chosen; "
                          "set data.val_fraction > 0 or give fusion.weights / --weights")
    grid = DEFAULT_GRID if grid is None else grid
    best_key, best = None, None
    for k, w in enumerate(grid):
        ws, wt = _check_weights(w)
        fused = weighted(val_spatial, val_temporal, (ws, wt))
        acc = float(np.mean(np.argmax(fused, axis=1) == labels))
        nll = float(-np.mean(np.log(np.clip(fused[np.arange(len(labels)), labels], 1e-12, None))))
        balance = abs(math.log((ws + 1e-9) / (wt + 1e-9)))
        key = (-round(acc, 12), round(nll, 12), round(balance, 12), k)
        if best_key is None or key < best_key:
            best_key, best = key, (ws, wt)
    return best


# ---------------------------------------------------------------- linear SVM

@dataclass
class LinearSVM:
    """One-vs-rest linear SVM: decision = features @ weights.T + bias (one column per class)."""
    weights: np.ndarray  # C x D
    bias: np.ndarray     # C
    C: float


def svm_features(s_spatial: Scores, s_temporal: Scores) -> np.ndarray:
    """L2-normalised concatenation [spatial softmax, temporal softmax] per video (N x 2C)."""
    check_aligned(s_spatial, s_temporal)
    x = np.concatenate([s_spatial.scores, s_temporal.scores], axis=1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _fit_binary(x: np.ndarray, y: np.ndarray, C: float, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """min_w 0.5|w|^2 + C sum_i max(0, 1 - y_i w.x_i)^2 by generalised Newton with Armijo steps.

    The objective is strictly convex and piecewise quadratic, so this converges to the unique
    optimum (in a handful of steps); deterministic, unlike sampling-based solvers.
    """
    d = x.shape[1]
    w = np.zeros(d)

    def objective(w: np.ndarray) -> float:
        m = np.maximum(0.0, 1.0 - y * (x @ w))
        return 0.5 * w @ w + C * (m @ m)

    f = objective(w)
    g0 = None
    for _ in range(max_iter):
        m = 1.0 - y * (x @ w)
        active = m > 0
        xa = x[active]
        g = w - 2 * C * xa.T @ (y[active] * m[active])
        gnorm = float(np.linalg.norm(g))
        g0 = gnorm if g0 is None else g0
        if gnorm <= tol * max(1.0, g0):
            break
        h = np.eye(d) + 2 * C * xa.T @ xa
        step_dir = np.linalg.solve(h, -g)
        step, slope = 1.0, float(g @ step_dir)
        while True:
            f_new = objective(w + step * step_dir)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step /= 2
        w = w + step * step_dir
        if f - f_new <= 1e-15 * max(1.0, abs(f)):
            f = f_new
            break
        f = f_new
    return w


def svm_fit(train_features: np.ndarray, train_labels: np.ndarray, C: float = 1.0,
            num_classes: int | None = None) -> LinearSVM:
    """One-vs-rest L2-regularised squared-hinge linear SVM (LIBLINEAR's default loss, with a bias
    feature of 1 regularised like `-B 1`). Pass only training videos' features."""
    x = np.asarray(train_features, np.float64)
    labels = np.asarray(train_labels, np.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],) or x.shape[0] == 0:
        raise FusionError(f"SVM needs an N x D feature matrix and N labels (N > 0); got {x.shape} and {labels.shape}")
    if not (C > 0 and math.isfinite(C)):
        raise FusionError(f"fusion.svm_c must be a positive number, got {C}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    xb = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    w = np.stack([_fit_binary(xb, np.where(labels == k, 1.0, -1.0), float(C)) for k in range(num_classes)])
    return LinearSVM(weights=w[:, :-1], bias=w[:, -1], C=float(C))


def svm_predict(model: LinearSVM, features: np.ndarray) -> np.ndarray:
    """Decision values, N x C (higher = more likely that class)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != model.weights.shape[1]:
        raise FusionError(f"SVM was trained on {model.weights.shape[1]}-dim features, got {x.shape}")
    return x @ model.weights.T + model.bias


def svm_fuse(train_spatial: Scores, train_temporal: Scores, test_spatial: Scores, test_temporal: Scores,
             C: float = 1.0) -> tuple[np.ndarray, LinearSVM]:
    """Fit the SVM on the training videos' scores and return (test decision values, model).

    Refuses training scores that share a video with the test scores, so the test set can
    never leak into the fusion.
    """
    check_aligned(train_spatial, train_temporal, "training spatial and temporal scores")
    check_aligned(test_spatial, test_temporal, "test spatial and temporal scores")
    if list(train_spatial.class_names) != list(test_spatial.class_names):
        raise FusionError("training and test scores have different class lists; evaluate both parts on the same split")
    overlap = sorted(set(train_spatial.video_ids) & set(test_spatial.video_ids))
    if overlap:
        raise FusionError(f"{len(overlap)} videos are in both the training and the test scores (e.g. {overlap[0]!r}); "
                          f"the SVM must be trained on training videos only")
    model = svm_fit(svm_features(train_spatial, train_temporal), train_spatial.labels, C,
                    num_classes=len(train_spatial.class_names))
    return svm_predict(model, svm_features(test_spatial, test_temporal)), model
