"""The torch TV-L1's building blocks (flowprep/tvl1_torch.py), each matching the OpenCV function
named in its docstring: bilinear resize (the pyramid), the centred gradient, the 5x5 median filter
(a sorting network) and the bicubic warp with a zero border (cv::remap INTER_CUBIC)."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

_MEDIAN_CHUNK = 1 << 27  # elements of the k*k median intermediates per chunk (512 MiB float32)


def _linear_taps(n_in: int, n_out: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of cv::resize INTER_LINEAR along one axis (scale = src/dst)."""
    f = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f)
    w = f - i0
    i0 = i0.astype(np.int64)
    low, high = i0 < 0, i0 >= n_in - 1
    w[low | high] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return t(i0), t(i1), t(w)


def resize_linear(x: torch.Tensor, out_hw: tuple[int, int], scale_yx: tuple[float, float]) -> torch.Tensor:
    """cv::resize(INTER_LINEAR) of the last two dims, with OpenCV's exact scale and border clamp.

    F.interpolate cannot be used: it derives the scale from the rounded output size (or floors the
    size when given a scale factor), while OpenCV resizes by exactly 0.8 into a rounded size.
    """
    h, w = x.shape[-2:]
    ix0, ix1, wx = _linear_taps(w, out_hw[1], scale_yx[1], x.device)
    iy0, iy1, wy = _linear_taps(h, out_hw[0], scale_yx[0], x.device)
    x = x.index_select(-1, ix0) * (1 - wx) + x.index_select(-1, ix1) * wx
    wy = wy[:, None]
    return x.index_select(-2, iy0) * (1 - wy) + x.index_select(-2, iy1) * wy


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """centeredGradient: 0.5*(next-prev), 0.5*(one-sided difference) on the border = replicate pad."""
    pad = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    dx = 0.5 * (pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2])
    dy = 0.5 * (pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1])
    return dx, dy


@functools.lru_cache(maxsize=None)
def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators (i, j, keep_min, keep_max) that leave the median of n values on wire n // 2.

    Batcher's odd-even merge sort on the next power of two (padding wires hold +inf and never
    move), pruned to the comparators the middle output depends on: 113 for a 5x5 window.
    """
    size = 1
    while size < n:
        size *= 2
    comps = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    need, kept = {n // 2}, []
    for i, j in reversed(comps):
        if i in need or j in need:
            kept.append((i, j, i in need, j in need))
            need |= {i, j}
    return tuple(reversed(kept))


def median_window(padded: torch.Tensor, k: int) -> torch.Tensor:
    """Median over each k x k window of (N, H+k-1, W+k-1) -> (N, H, W), by a min/max selection network.

    A few times faster than unfold + median on CPU, and one fused kernel under torch.compile.
    """
    h, w = padded.shape[1] - (k - 1), padded.shape[2] - (k - 1)
    vals = [padded[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]
    for i, j, keep_min, keep_max in _median_network(k * k):
        lo, hi = vals[i], vals[j]
        if keep_min:
            vals[i] = torch.minimum(lo, hi)
        if keep_max:
            vals[j] = torch.maximum(lo, hi)
    return vals[(k * k) // 2]


def median_filter(u: torch.Tensor, k: int, window=median_window) -> torch.Tensor:
    """cv::medianBlur(ksize=k) of each channel of u (B,C,H,W), border replicated (its float32 path)."""
    b, c, h, w = u.shape
    r = k // 2
    flat = F.pad(u.reshape(b * c, 1, h, w), (r, r, r, r), mode="replicate")[:, 0]
    step = max(1, _MEDIAN_CHUNK // (k * k * h * w))  # bounds the k*k live intermediates
    out = [window(flat[s : s + step], k) for s in range(0, b * c, step)]
    return torch.cat(out).view(b, c, h, w)


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """interpolateCubic (A = -0.75) weights of the taps at -1, 0, 1, 2 for fractions t."""
    a = -0.75
    t1 = t + 1
    s = 1 - t
    c0 = ((a * t1 - 5 * a) * t1 + 8 * a) * t1 - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = ((a + 2) * s - (a + 3)) * s * s + 1
    return [c0, c1, c2, 1 - c0 - c1 - c2]


def warp(i1_stack: torch.Tensor, u: torch.Tensor, base_x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
    """cv::remap(INTER_CUBIC, BORDER_CONSTANT 0) of the channels of i1_stack at (x + u1, y + u2).

    Written out with gathers rather than grid_sample: grid_sample's normalised coordinates pick up
    rounding errors (~1e-3 grey levels at zero flow), which OpenCV does not have and which make a
    static pair come out with non-zero flow. OpenCV 5 interpolates float maps at full precision.
    """
    b, c, h, w = i1_stack.shape
    # points more than 2 px outside read only zeros: clamp them there so floor() stays small
    mx = (base_x + u[:, 0]).clamp(-3.0, w + 2.0)
    my = (base_y + u[:, 1]).clamp(-3.0, h + 2.0)
    x0, y0 = torch.floor(mx), torch.floor(my)
    wx, wy = _cubic_weights(mx - x0), _cubic_weights(my - y0)
    x0, y0 = x0.long() - 1, y0.long() - 1
    flat = i1_stack.reshape(b, c, h * w)
    out = torch.zeros_like(i1_stack)
    for j in range(4):
        yj = y0 + j
        y_ok = (yj >= 0) & (yj < h)
        row_base = yj.clamp(0, h - 1) * w
        row = torch.zeros_like(i1_stack)
        for i in range(4):
            xi = x0 + i
            ok = y_ok & (xi >= 0) & (xi < w)
            idx = (row_base + xi.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
            row += flat.gather(2, idx).view(b, c, h, w) * (wx[i] * ok)[:, None]
        out += row * wy[j][:, None]
    return out
