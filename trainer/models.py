"""Backbones for the two streams: torchvision ImageNet architectures with a new classifier.

Weights are never downloaded: `pretrained` is a local torchvision state_dict file (e.g.
resnet50-0676ba61.pth fetched once by hand), or "" to start from random weights. For the
temporal stream the first convolution takes 2L channels; with pretrained weights it gets
the paper's cross-modality init: the RGB filters averaged over their 3 input channels and
replicated 2L times.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11_bn", "vgg16", "vgg16_bn", "vgg19_bn")


class ModelError(ValueError):
    """An unknown architecture, or a weights file that is missing or does not fit."""


def first_conv_name(arch: str) -> str:
    return "conv1" if arch.startswith("resnet") else "features.0"


def classifier_names(arch: str) -> tuple[str, ...]:
    return ("fc",) if arch.startswith("resnet") else ("classifier.6",)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision state_dict file, or one of our checkpoints (its "model" entry)."""
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
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} does not hold a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained(model: nn.Module, arch: str, path: str | Path, in_channels: int) -> None:
    """Load ImageNet weights into `model` (built with a 1000-way head), all but the classifier;
    the first conv is averaged over RGB and replicated when `in_channels` != 3."""
    sd = load_state_dict_file(path)
    own = model.state_dict()
    conv = first_conv_name(arch) + ".weight"
    heads = tuple(h + "." for h in classifier_names(arch))
    sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
    missing = sorted(k for k in own if k not in sd and not k.startswith(heads))
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        raise ModelError(f"{path} does not fit {arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; is it a torchvision "
                         f"{arch} state_dict? (pass the matching --arch)")
    if conv in sd and in_channels != sd[conv].shape[1]:
        w = sd[conv]
        if w.shape[1] != 3:
            raise ModelError(f"{path}: first conv has {w.shape[1]} input channels; cross-modality init needs RGB (3)")
        sd[conv] = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ModelError(f"{path} does not fit {arch}: shape mismatch in {', '.join(bad[:3])}")
    model.load_state_dict(sd, strict=False)


def build_model(arch: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5,
                pretrained: str | Path = "") -> nn.Module:
    """A torchvision `arch` for `num_classes`, taking `in_channels` (3 RGB, 2L flow)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None)  # never download
    if in_channels != 3:
        name = first_conv_name(arch)
        old = model.get_submodule(name)
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if pretrained:
        load_pretrained(model, arch, pretrained, in_channels)
    if arch.startswith("resnet"):
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    else:
        for m in model.classifier:
            if isinstance(m, nn.Dropout):
                m.p = dropout
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return model


def freeze_bn(model: nn.Module) -> None:
    """Keep BatchNorm layers on their running statistics (call after each model.train())."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
