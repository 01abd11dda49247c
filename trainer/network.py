"""Two or more streams and a fusion head as one model: `TwoStreamNetwork`.

    model = TwoStreamNetwork(num_classes=101)            # fresh rgb + flow resnet18 streams
    logits = model(rgb, flow)                            # fused class logits (log-probabilities)
    model = TwoStreamNetwork.from_checkpoints([spatial_best, temporal_best], head)   # trained streams

The fusion heads are trainer/heads.py's; a run's trained streams with the fusion fuse-eval fitted
are `trainer.fusion.network_from_run(out)` (the model knows nothing of files).
Inputs may be uint8 batches as the loaders give them (each stream's input kind normalises them)
or float tensors already normalised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from trainer.heads import Fusion, make_fusion
from trainer.models import build_model, forward_features, head
from trainer.streams import get_input


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
