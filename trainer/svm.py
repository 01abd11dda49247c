"""A one-vs-rest linear SVM in numpy, deterministic: the paper's SVM fusion of the streams' scores
(trainer/fusion.py fits it on the training videos' scores only)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class SVMError(ValueError):
    """Features or settings an SVM cannot be fitted on."""


@dataclass
class LinearSVM:
    """One-vs-rest linear SVM: decision = features @ weights.T + bias (one column per class)."""
    weights: np.ndarray  # C x D
    bias: np.ndarray     # C
    C: float


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
        raise SVMError(f"SVM needs an N x D feature matrix and N labels (N > 0); got {x.shape} and {labels.shape}")
    if not (C > 0 and math.isfinite(C)):
        raise SVMError(f"fusion.svm_c must be a positive number, got {C}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    xb = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    w = np.stack([_fit_binary(xb, np.where(labels == k, 1.0, -1.0), float(C)) for k in range(num_classes)])
    return LinearSVM(weights=w[:, :-1], bias=w[:, -1], C=float(C))


def svm_predict(model: LinearSVM, features: np.ndarray) -> np.ndarray:
    """Decision values, N x C (higher = more likely that class)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != model.weights.shape[1]:
        raise SVMError(f"SVM was trained on {model.weights.shape[1]}-dim features, got {x.shape}")
    return x @ model.weights.T + model.bias
