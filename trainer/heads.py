"""Fusion heads: the modules that fuse the streams' outputs, one entry each in FUSIONS.

A head takes, per stream, log-probabilities (`log_softmax` of a sample's logits, or the log of
the test protocol's averaged softmax for a video) and the backbone's pooled features, and
returns fused logits:

* average      log of the streams' mean softmax (the paper's averaging);
* calibrated   each stream calibrated first: W_k log p_k + b_k (matrix scaling of its
               log-probabilities, i.e. Dirichlet calibration; W_k = I, b_k = 0 leaves it as it
               is), then averaged;
* weighted     log of sum_k w_k softmax_k: weights fixed, or learnable (a sigmoid alpha for two
               streams, a softmax over more);
* learned      an MLP on the concatenated log-probabilities;
* feature      an MLP on the concatenated pooled features (feature-level fusion);
* attention    alpha = sigmoid(W [h_1; h_2] + b) per sample (a softmax over streams for more
               than two), h = sum_k alpha_k h_k over (projected) features, then a linear
               classifier; `last_alpha` keeps the weights of the latest forward for reports.

Heads know nothing of files: fitting them on scores, and saving and loading them (fusion.pt),
is trainer/fusion.py's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Fusion(nn.Module):
    """Base: `forward(logps, feats) -> fused logits`; `uses` says which inputs matter; `build(n,
    num_classes, dims, **settings)` makes one for n streams (what `make_fusion` calls)."""

    uses = "logits"

    def __init__(self):
        super().__init__()
        self.last_alpha: torch.Tensor | None = None


class AverageFusion(Fusion):
    @classmethod
    def build(cls, n: int, num_classes: int, dims: Sequence[int], **kw) -> "AverageFusion":
        return cls()

    def forward(self, logps: Sequence[torch.Tensor], feats=None) -> torch.Tensor:
        return torch.logsumexp(torch.stack(list(logps)), 0) - torch.log(torch.tensor(float(len(logps))))


class CalibratedFusion(Fusion):
    """Matrix-scaling calibration per stream (W_k, b_k: calibrated log p = log_softmax(W_k log p_k
    + b_k)), then averaging. A temperature is W_k = I / T; a full W_k can also mix classes, so a
    stream can learn to say 50/50 between two classes it cannot tell apart."""

    @classmethod
    def build(cls, n: int, num_classes: int, dims: Sequence[int], **kw) -> "CalibratedFusion":
        return cls(n, num_classes)

    def __init__(self, n: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_classes).repeat(n, 1, 1))
        self.bias = nn.Parameter(torch.zeros(n, num_classes))

    def calibrate(self, logps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.log_softmax(z @ self.weight[k].T + self.bias[k], -1) for k, z in enumerate(logps)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        log_t = state_dict.pop(prefix + "log_t", None)
        if log_t is not None:  # fusion.pt of an older version: a temperature per stream, as W_k = I / T_k
            eye = torch.eye(self.weight.shape[-1])
            state_dict[prefix + "weight"] = torch.stack([eye / t for t in torch.as_tensor(log_t).exp()])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, logps, feats=None) -> torch.Tensor:
        cal = self.calibrate(logps)
        return torch.logsumexp(torch.stack(cal), 0) - torch.log(torch.tensor(float(len(cal))))


class WeightedFusion(Fusion):
    @classmethod
    def build(cls, n: int, num_classes: int, dims: Sequence[int], **kw) -> "WeightedFusion":
        return cls(n, kw.get("weights"), kw.get("learnable", True))

    def __init__(self, n: int, weights: Sequence[float] | None = None, learnable: bool = True):
        super().__init__()
        self.n = n
        if weights is not None:
            w = torch.tensor([float(v) for v in weights])
            w = w / w.sum()
        else:
            w = torch.full((n,), 1.0 / n)
        # Two streams: w = (alpha, 1 - alpha), alpha = sigmoid(a); more: w = softmax(a).
        a = torch.logit(w[:1].clamp(1e-6, 1 - 1e-6)) if n == 2 else torch.log(w.clamp_min(1e-6))
        self.a = nn.Parameter(a, requires_grad=learnable)

    def weights(self) -> torch.Tensor:
        if self.n == 2:
            alpha = torch.sigmoid(self.a)
            return torch.cat([alpha, 1 - alpha])
        return torch.softmax(self.a, 0)

    def forward(self, logps, feats=None) -> torch.Tensor:
        w = self.weights()
        self.last_alpha = w.detach()
        return torch.logsumexp(torch.stack([z + torch.log(w[k]) for k, z in enumerate(logps)]), 0)


class _Standardize(nn.Module):
    """Inputs shifted and scaled by statistics of the fitting set (buffers, saved with the head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x):
        return (x - self.mean) / self.std


def _mlp(dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(_Standardize(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


def _set_stats(norm: _Standardize, x: torch.Tensor) -> None:
    norm.mean.copy_(x.mean(0))
    norm.std.copy_(x.std(0, unbiased=False).clamp_min(1e-3))


class LearnedFusion(Fusion):
    @classmethod
    def build(cls, n: int, num_classes: int, dims: Sequence[int], **kw) -> "LearnedFusion":
        return cls(n, num_classes, kw.get("hidden", 64), kw.get("dropout", 0.2))

    def __init__(self, n: int, num_classes: int, hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        self.mlp = _mlp(n * num_classes, hidden, num_classes, dropout)

    def prepare(self, logps, feats) -> None:
        """Input statistics of the fitting set."""
        _set_stats(self.mlp[0], torch.cat(list(logps), -1))

    def forward(self, logps, feats=None) -> torch.Tensor:
        return self.mlp(torch.cat(list(logps), -1))


class _OnFeatures(Fusion):
    """Base of the heads on the streams' pooled backbone features (`dims`: their sizes)."""
    uses = "features"

    @classmethod
    def build(cls, n: int, num_classes: int, dims: Sequence[int], **kw) -> "_OnFeatures":
        return cls(list(dims), num_classes, kw.get("hidden", 256), kw.get("dropout", 0.2))


class FeatureFusion(_OnFeatures):
    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.mlp = _mlp(sum(dims), hidden, num_classes, dropout)

    def prepare(self, logps, feats) -> None:
        _set_stats(self.mlp[0], torch.cat(list(feats), -1))

    def forward(self, logps, feats) -> torch.Tensor:
        return self.mlp(torch.cat(list(feats), -1))


class AttentionFusion(_OnFeatures):
    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.n = len(dims)
        self.norms = nn.ModuleList(_Standardize(d) for d in dims)
        self.proj = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.gate = nn.Linear(sum(dims), 1 if self.n == 2 else self.n)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def prepare(self, logps, feats) -> None:
        for norm, f in zip(self.norms, feats):
            _set_stats(norm, f)

    def alpha(self, feats) -> torch.Tensor:
        """Per-sample stream weights (B, n)."""
        x = torch.cat([norm(f) for norm, f in zip(self.norms, feats)], -1)
        g = self.gate(x)
        if self.n == 2:
            a = torch.sigmoid(g)
            return torch.cat([a, 1 - a], -1)
        return torch.softmax(g, -1)

    def forward(self, logps, feats) -> torch.Tensor:
        alpha = self.alpha(feats)
        self.last_alpha = alpha.detach()
        h = sum(alpha[:, k:k + 1] * torch.relu(p(norm(f))) for k, (norm, p, f) in
                enumerate(zip(self.norms, self.proj, feats)))
        return self.classifier(self.drop(h))


FUSIONS = {"average": AverageFusion, "calibrated": CalibratedFusion, "weighted": WeightedFusion,
           "learned": LearnedFusion, "feature": FeatureFusion, "attention": AttentionFusion}


def make_fusion(kind: str, n: int, num_classes: int, dims: Sequence[int] = (), **kw) -> Fusion:
    """A fusion module by name, for `n` streams with feature sizes `dims`."""
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[kind].build(n, num_classes, dims, **kw)


def fusion_module(method: str, params: dict, n: int) -> Fusion:
    """The module a fitted method's parameters (fusion.pt) describe."""
    if method == "average":
        return AverageFusion()
    if method == "weighted":
        return WeightedFusion(n, [float(w) for w in params["weights"]], learnable=False)
    if "module" not in params:
        raise ValueError(f"fusion {method!r} has no network form (it is fitted on whole-video scores only)")
    cfg = params["module"]
    module = make_fusion(cfg["kind"], cfg["n"], cfg["num_classes"], cfg.get("dims", ()), **cfg.get("kw", {}))
    module.load_state_dict({k: torch.as_tensor(v) for k, v in params["state"].items()})
    return module.eval()
