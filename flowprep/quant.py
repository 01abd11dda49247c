"""Flow quantization to uint8, exactly as denseflow and every TSN-style loader expect.

q = round(255 * (clip(v, -b, b) + b) / (2b)); the inverse maps q back to v = q * 2b / 255 - b,
so the round trip error is at most half a step, b / 255.
"""
from __future__ import annotations

import numpy as np

DEFAULT_BOUND = 20.0


def quantize(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Clip a float flow field (any shape, usually HxWx2) to +-bound and map it to uint8."""
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    v = np.clip(np.asarray(flow, dtype=np.float32), -bound, bound)   # a new array: the rest in place
    v += np.float32(bound)
    v *= np.float32(255.0 / (2.0 * bound))
    # np.rint rounds half to even; denseflow uses cvRound (also half to even), so ties agree.
    return np.rint(v, out=v).astype(np.uint8)


def dequantize(q: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Exact inverse of `quantize` on its codes: uint8 -> float32 displacement in pixels."""
    return np.asarray(q, dtype=np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)
