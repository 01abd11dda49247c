"""One forward pass of a stream for training and evaluation alike: uint8 batches as the loaders
give them -> class logits, with the training flips applied on the device (trainer/transforms.py)
and the input kind's normalisation (trainer/streams.py)."""
from __future__ import annotations

import torch
from torch import nn

from trainer import transforms as T
from trainer.streams import Input


def image_logits(model: nn.Module, x: torch.Tensor, device: torch.device, kind: Input, length: int,
                 mean_subtraction: bool, amp: bool = True, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch (K segments or crops) -> float32 class logits [B, K, classes].

    `flips` (bool [B]): the training flips the loader chose, applied here to the whole batch."""
    x = x.to(device, non_blocking=True)
    if flips is not None:
        x = T.flip_batch(x, flips.to(device, non_blocking=True), kind.negate_on_flip(length))
    b, k = x.shape[:2]
    x = kind.to_network(x.flatten(0, 1), length, mean_subtraction)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(x)
    return logits.float().view(b, k, -1)


def forward(model: nn.Module, x, device: torch.device, kind: Input, args: dict) -> torch.Tensor:
    """uint8 [B, K, C, S, S] batch (or (batch, flips) from a training loader) -> class logits
    [B, classes], averaged over the K segments."""
    x, flips = x if isinstance(x, (tuple, list)) else (x, None)
    return image_logits(model, x, device, kind, args["flow_length"], args["mean_subtraction"], args["amp"],
                        flips).mean(1)
