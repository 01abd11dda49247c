"""Fusion as a model: `TwoStreamNetwork` (the streams' backbones + one fusion module) and the
fusion modules, one entry each in FUSIONS.

    model = TwoStreamNetwork(num_classes=101)            # fresh rgb + flow resnet18 streams
    logits = model(rgb, flow)                            # fused class logits (log-probabilities)
    model = TwoStreamNetwork.from_run("runs/ucf101", fusion="attention")   # trained streams + fitted fusion

A fusion module takes, per stream, log-probabilities (`log_softmax` of a sample's logits, or
the log of the test protocol's averaged softmax for a video) and the backbone's pooled
features, and returns fused logits:

* average      log of the streams' mean softmax (the paper's averaging);
* calibrated   each stream calibrated first: log p / T_k + b_k (a temperature per stream and a
               bias per class, vector scaling fitted on the validation part), then averaged;
* weighted     log of sum_k w_k softmax_k: weights fixed, or learnable (a sigmoid alpha for two
               streams, a softmax over more);
* learned      an MLP on the concatenated log-probabilities;
* feature      an MLP on the concatenated pooled features (feature-level fusion);
* attention    alpha = sigmoid(W [h_1; h_2] + b) per sample (a softmax over streams for more
               than two), h = sum_k alpha_k h_k over (projected) features, then a linear
               classifier; `last_alpha` keeps the weights of the latest forward for reports.

Inputs may be uint8 batches as the loaders give them (each stream's input kind normalises them)
or float tensors already normalised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from trainer.models import build_model, forward_features, head
from trainer.streams import get_input


class Fusion(nn.Module):
    """Base: `forward(logps, feats) -> fused logits`; `uses` says which inputs matter."""

    uses = "logits"

    def __init__(self):
        super().__init__()
        self.last_alpha: torch.Tensor | None = None


class AverageFusion(Fusion):
    def forward(self, logps: Sequence[torch.Tensor], feats=None) -> torch.Tensor:
        return torch.logsumexp(torch.stack(list(logps)), 0) - torch.log(torch.tensor(float(len(logps))))


class CalibratedFusion(Fusion):
    """Vector-scaling calibration per stream (log T_k, b_k), then averaging."""

    def __init__(self, n: int, num_classes: int):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(n))
        self.bias = nn.Parameter(torch.zeros(n, num_classes))

    def calibrate(self, logps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.log_softmax(z / self.log_t[k].exp() + self.bias[k], -1) for k, z in enumerate(logps)]

    def forward(self, logps, feats=None) -> torch.Tensor:
        cal = self.calibrate(logps)
        return torch.logsumexp(torch.stack(cal), 0) - torch.log(torch.tensor(float(len(cal))))


class WeightedFusion(Fusion):
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
    def __init__(self, n: int, num_classes: int, hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        self.mlp = _mlp(n * num_classes, hidden, num_classes, dropout)

    def prepare(self, logps, feats) -> None:
        """Input statistics of the fitting set."""
        _set_stats(self.mlp[0], torch.cat(list(logps), -1))

    def forward(self, logps, feats=None) -> torch.Tensor:
        return self.mlp(torch.cat(list(logps), -1))


class FeatureFusion(Fusion):
    uses = "features"

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.mlp = _mlp(sum(dims), hidden, num_classes, dropout)

    def prepare(self, logps, feats) -> None:
        _set_stats(self.mlp[0], torch.cat(list(feats), -1))

    def forward(self, logps, feats) -> torch.Tensor:
        return self.mlp(torch.cat(list(feats), -1))


class AttentionFusion(Fusion):
    uses = "features"

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
    if kind == "average":
        return AverageFusion()
    if kind == "calibrated":
        return CalibratedFusion(n, num_classes)
    if kind == "weighted":
        return WeightedFusion(n, kw.get("weights"), kw.get("learnable", True))
    if kind == "learned":
        return LearnedFusion(n, num_classes, kw.get("hidden", 64), kw.get("dropout", 0.2))
    cls = FeatureFusion if kind == "feature" else AttentionFusion
    return cls(list(dims), num_classes, kw.get("hidden", 256), kw.get("dropout", 0.2))


class Stream(nn.Module):
    """One stream: a backbone and what its input is (kind, L, mean subtraction)."""

    def __init__(self, arch: str, num_classes: int, input: str = "rgb", flow_length: int = 10,
                 mean_subtraction: bool = True, dropout: float = 0.5, pretrained: str | Path = ""):
        super().__init__()
        self.arch, self.input, self.flow_length, self.mean_subtraction = arch, input, flow_length, mean_subtraction
        self.kind = get_input(input)
        self.net = build_model(arch, num_classes, self.kind.channels(flow_length), dropout, pretrained)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) of a batch (uint8 as loaded, or float already normalised)."""
        if x.dtype == torch.uint8:
            x = self.kind.to_network(x, self.flow_length, self.mean_subtraction)
        feats, logits = forward_features(self.net, self.arch, x)
        return logits, feats


class TwoStreamNetwork(nn.Module):
    """Two or more streams and a fusion: forward(*inputs) -> fused logits [B, classes].

    `streams`: (input kind, arch) per stream, in the order inputs are passed. `fusion`: a name
    of FUSIONS, or a Fusion module. Built fresh by default; `from_run` loads trained streams.
    """

    def __init__(self, num_classes: int = 101, streams: Sequence[tuple[str, str]] = (("rgb", "resnet18"),
                 ("flow", "resnet18")), fusion: str | Fusion = "average", flow_length: int = 10,
                 mean_subtraction: bool = True, dropout: float = 0.5, **fusion_kw):
        super().__init__()
        self.streams = nn.ModuleList(Stream(arch, num_classes, kind, flow_length, mean_subtraction, dropout)
                                     for kind, arch in streams)
        if isinstance(fusion, str):
            dims = [head(s.net, s.arch).in_features for s in self.streams]
            fusion = make_fusion(fusion, len(self.streams), num_classes, dims, **fusion_kw)
        self.fusion = fusion

    def forward(self, *inputs: torch.Tensor, return_alpha: bool = False):
        if len(inputs) != len(self.streams):
            raise ValueError(f"this network has {len(self.streams)} streams "
                             f"({', '.join(s.input for s in self.streams)}) but got {len(inputs)} inputs")
        outs = [s(x) for s, x in zip(self.streams, inputs)]
        logps = [torch.log_softmax(logits.float(), -1) for logits, _ in outs]
        fused = self.fusion(logps, [f.float() for _, f in outs])
        return (fused, self.fusion.last_alpha) if return_alpha else fused

    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence[dict], fusion: str | Fusion = "average",
                         **fusion_kw) -> "TwoStreamNetwork":
        """From trained streams' checkpoints (best.pt contents, same classes) and a fusion."""
        names = [list(ck["class_names"]) for ck in checkpoints]
        if any(n != names[0] for n in names):
            raise ValueError("the streams were trained on different class lists; train them on the same split")
        net = cls(len(names[0]), [(ck.get("input", "rgb"), ck["arch"]) for ck in checkpoints], "average")
        for s, ck in zip(net.streams, checkpoints):
            s.flow_length = int(ck.get("flow_length", 10))
            s.mean_subtraction = bool(ck.get("mean_subtraction", True))
            s.net = build_model(ck["arch"], ck["num_classes"], ck["in_channels"], dropout=0.0)
            s.net.load_state_dict(ck["model"])
        if isinstance(fusion, str):
            dims = [head(s.net, s.arch).in_features for s in net.streams]
            fusion = make_fusion(fusion, len(net.streams), len(names[0]), dims, **fusion_kw)
        net.fusion = fusion
        net.class_names = names[0]
        return net

    @classmethod
    def from_run(cls, out: str | Path, fusion: str | None = None, streams: Sequence[str] | None = None):
        """Trained streams of a run folder with the fusion fitted by fuse-eval (fusion/fusion.pt;
        default: the best fusion it chose on the validation part)."""
        from trainer.checkpoint import load_best
        from trainer.fusion import load_fitted

        fitted = load_fitted(Path(out) / "fusion" / "fusion.pt")
        names = list(streams or fitted["streams"])
        method = fusion or fitted["best"] or "average"
        cks = [load_best(out, n) for n in names]
        return cls.from_checkpoints(cks, fusion_module(method, fitted["params"].get(method, {}), len(names)))


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
