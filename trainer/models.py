"""Backbones for the streams: torchvision ImageNet architectures, or the paper's CNN-M-2048,
with a new classifier for any input's channel count.

Saved weights are plain torchvision state_dicts: dropout sits inside the classifier layer's
forward (`DropoutLinear`, no parameters of its own), so `torchvision.models.resnet50(
num_classes=K).load_state_dict(ckpt["model"])` works for the ResNets and VGGs.

Weights are never downloaded: `pretrained` is a local file, a torchvision state_dict (e.g.
resnet50-0676ba61.pth fetched once by hand), one of our checkpoints, or an MMAction2 /
mmengine checkpoint (`state_dict` with `backbone.` / `cls_head.` prefixes; MMAction2's own
ResNet names mapped to torchvision's), so Kinetics-pretrained TSN weights can seed a stream.
A first convolution whose input channels do not fit gets the paper's cross-modality init:
the RGB filters averaged over their 3 input channels and replicated to every input channel;
one that already fits (a flow TSN's 2L channels) is taken as is.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision
from torch import nn

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11_bn", "vgg16", "vgg16_bn",
                     "vgg19_bn")
ARCHS = TORCHVISION_ARCHS + ("cnn_m_2048",)


class ModelError(ValueError):
    """An unknown architecture, or a weights file that is missing or does not fit."""


class DropoutLinear(nn.Linear):
    """nn.Linear with dropout on its input: a classifier whose state_dict is a plain Linear's."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.5):
        super().__init__(in_features, out_features)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.dropout(x, self.p, self.training))


class CNNM2048(nn.Module):
    """CNN-M-2048 of the paper's Figure 1 (Chatfield et al. 2014), for any input channel count.

    conv1 96 7x7 /2, LRN, pool 2; conv2 256 5x5 /2, LRN, pool 2; conv3-5 512 3x3; pool 2;
    full6 4096, full7 2048 (dropout after each); a 6x6 adaptive pool before full6 lets crops
    smaller than 224 through (at 224 it is the identity).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        lrn = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, 7, stride=2), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(96, 256, 5, stride=2, padding=1), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 2048), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(2048, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def first_conv_name(arch: str) -> str:
    return "conv1" if arch.startswith("resnet") else "features.0"


def head_name(arch: str) -> str:
    """The final classifier layer: its input is the pooled feature vector (used by feature fusion)."""
    return "fc" if arch.startswith("resnet") else "classifier.6"


def head(model: nn.Module, arch: str) -> nn.Linear:
    return model.get_submodule(head_name(arch))


def forward_features(model: nn.Module, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features fed to the classifier, logits) in one forward pass."""
    seen = {}
    handle = head(model, arch).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen["x"], logits


# ---------------------------------------------------------------- weights files

_MM_CONV = re.compile(r"^(.*?)conv(\d*)\.conv\.(.*)$")
_MM_BN = re.compile(r"^(.*?)conv(\d*)\.bn\.(.*)$")


def _from_mmaction(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmengine checkpoint's backbone in torchvision names (heads are dropped: a new one is trained).

    MMAction2's own ResNet wraps each conv in a ConvModule: conv1.conv / conv1.bn ->
    conv1 / bn1, downsample.conv / downsample.bn -> downsample.0 / downsample.1.
    """
    out = {}
    for k, v in sd.items():
        if not k.startswith("backbone."):
            continue  # cls_head.*, data_preprocessor.*
        k = k.removeprefix("backbone.")
        k = k.replace("downsample.conv.", "downsample.0.").replace("downsample.bn.", "downsample.1.")
        if m := _MM_CONV.match(k):
            k = f"{m.group(1)}conv{m.group(2)}.{m.group(3)}"
        elif m := _MM_BN.match(k):
            k = f"{m.group(1)}bn{m.group(2)}.{m.group(3)}"
        out[k] = v
    return out


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision state_dict file, one of our checkpoints ("model"), or an mmengine one ("state_dict")."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist; download the torchvision state_dict "
                         f"(e.g. from https://download.pytorch.org/models/) and pass its path, or pass no --pretrained")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ModelError(f"{path} is not a readable PyTorch state_dict file: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    elif isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} does not hold a state_dict (a dict of tensors)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = _from_mmaction(sd)
    return sd


def load_pretrained(model: nn.Module, arch: str, path: str | Path, in_channels: int) -> None:
    """Load weights into `model`, all but the classifier; the first conv gets the
    cross-modality init when its input channels differ from the file's."""
    sd = load_state_dict_file(path)
    own = model.state_dict()
    conv = first_conv_name(arch) + ".weight"
    skip = head_name(arch) + "."
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    missing = sorted(k for k in own if k not in sd and not k.startswith(skip))
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        raise ModelError(f"{path} does not fit {arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; is it a torchvision "
                         f"{arch} state_dict? (pass the matching --arch)")
    if conv in sd and in_channels != sd[conv].shape[1]:
        w = sd[conv]
        if w.shape[1] != 3:
            raise ModelError(f"{path}: first conv has {w.shape[1]} input channels and the stream takes {in_channels}; "
                             "cross-modality init needs RGB (3) filters")
        sd[conv] = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ModelError(f"{path} does not fit {arch}: shape mismatch in {', '.join(bad[:3])}")
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------- building

def build_model(arch: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5,
                pretrained: str | Path = "") -> nn.Module:
    """`arch` for `num_classes`, taking `in_channels` (3 RGB, 2L flow, ...)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "cnn_m_2048":
        model = CNNM2048(1000, in_channels, dropout)
    else:
        model = getattr(torchvision.models, arch)(weights=None)  # never download
        if in_channels != 3:
            name = first_conv_name(arch)
            old = model.get_submodule(name)
            new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                            bias=old.bias is not None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    if pretrained:
        load_pretrained(model, arch, pretrained, in_channels)
    if arch.startswith("resnet"):
        model.fc = DropoutLinear(model.fc.in_features, num_classes, dropout)
    else:
        for m in model.classifier:
            if isinstance(m, nn.Dropout):
                m.p = dropout
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return model


def freeze_backbone(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """Train the last layer only (the paper's "last layer" spatial variant): everything but the
    classifier stops learning; returns the parameters left to train."""
    keep = {id(p) for p in head(model, arch).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


def freeze_bn(model: nn.Module) -> None:
    """Keep BatchNorm layers on their running statistics (call after each model.train())."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
