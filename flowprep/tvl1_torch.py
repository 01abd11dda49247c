"""Batched TV-L1 optical flow in PyTorch: a port of OpenCV's `cv2.optflow.DualTVL1OpticalFlow`.

The algorithm is Zach-Pock-Bischof's duality-based TV-L1 with the Wedel et al. improvements, as in
Sanchez, Meinhardt-Llopis & Facciolo, "TV-L1 Optical Flow Estimation", IPOL 2013, and follows
OpenCV's `modules/optflow/src/tvl1flow.cpp` detail for detail:

- pyramid: each level is `cv::resize(INTER_LINEAR)` of the previous one by `scale_step` (no blur),
  sizes rounded, stopping before a level narrower or shorter than 16 px;
- per level: centered-difference gradient of I1 (half one-sided differences at the border), then
  `warps` times: bicubic remap of I1 and its gradient at x + u (zero outside the image), then up
  to `outer_iterations` x (5x5 median filter of u, up to `inner_iterations` x (thresholding step,
  u update, dual p update)), stopping as soon as the sum of squared u changes falls to
  `epsilon**2 * area` or below;
- the dual variables p restart at zero on each level; u is upsampled bilinearly to the next finer
  level and multiplied by 1 / scale_step.

`gamma` (illumination term) and `useInitialFlow` are left at OpenCV's defaults (0, False).

How close to OpenCV (tests/test_tvl1_torch.py; figures in docs/performance.md): each building
block is OpenCV's function (median filter and gradient exactly, remap and resize to float
rounding), one scale and one warp are 1e-7 px from OpenCV on average; through `accurate`'s 5 x 5
pyramid, rounding differences grow where the flow is ambiguous, about as far as OpenCV is from
itself when its input moves by 1e-4 grey levels. For OpenCV's flow bit for bit on the CPU, use
the fused engine (flowprep/tvl1_fused.py).

Determinism: a pair's flow does not depend on what else is in its batch, to the last bit. Every op
is elementwise per pair except the epsilon error, which is summed in int64 fixed point (`_step`),
because integer addition is associative and torch picks a float sum's order from the shape.

Fixed batches (`tvl1`): all pairs of a batch go through the pyramid together. Epsilon stopping is
per pair: a pair whose error has converged is frozen by a mask (its u and p no longer change,
exactly as if it had left the loop like in OpenCV), and when at most 3/4 of the pairs still being
iterated are live, the live ones are gathered into a smaller working batch so finished pairs stop
costing compute. This needs one device-to-host sync per inner iteration (the live flags), cheap next
to the iteration at useful batch sizes. But a batch still takes as many sequential steps as its
slowest pair at every warp: a high-motion pair runs up to the 300-iteration cap per warp while a
static one stops after 1, and on a GPU, where a step's time is mostly launch latency, the batch
waits for it.

Continuous batching (pairs entering and leaving the device batches one by one) is in
flowprep/tvl1_continuous.py, on the building blocks of this module.

Inputs are grayscale frames on the 0..255 scale (uint8, or float already in 0..255; note that
OpenCV itself multiplies *float* input by 255, so compare with OpenCV using uint8 frames).

Parameters and presets are those of the OpenCV path (`flowprep.presets.TVL1_PRESETS`), so
`--preset accurate|fast` mean the same on both devices.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flowprep.presets import ACCURATE as DEFAULTS  # OpenCV's DualTVL1OpticalFlow defaults
from flowprep.tvl1_ops import centered_gradient, median_filter, median_window, resize_linear, warp

_FLT_EPSILON = float(np.finfo(np.float32).eps)  # std::numeric_limits<float>::epsilon() in estimateV
_COMPACT_FRACTION = 0.75  # shrink the working batch when at most this share of it is still live

def _error_fixed_point(h: int, w: int, scaled_eps: float) -> tuple[float, float]:
    """(cap, scale) of the fixed-point epsilon error of an h x w level, see `_step`.

    Each pixel's squared change is clamped to cap = 2 * scaled_eps (one such pixel already
    decides the test, so the clamp cannot change it) and counted in units of 1 / scale, a power
    of two with h * w * cap * scale <= 2**62: the int64 sum cannot overflow and resolves the
    threshold to 2 * (h * w)**2 / 2**62 of itself (3e-9 at 340x256), finer than OpenCV's own
    float32 accumulation.
    """
    cap = 2.0 * scaled_eps
    return cap, 2.0 ** min(100, math.floor(math.log2(2.0**62 / (h * w * cap))))  # 2**100: float32-safe


def _step(
    u: torch.Tensor,
    p: torch.Tensor,
    i1w_grad: torch.Tensor,
    grad: torch.Tensor,
    rho_c: torch.Tensor,
    live: torch.Tensor,
    l_t: float,
    theta: float,
    taut: float,
    err_cap: torch.Tensor,
    err_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One inner iteration: estimateV, divergence, estimateU (+ error), forwardGradient, estimateDualVariables.

    u (B,2,H,W) flow; p (B,2,2,H,W) dual variables [flow component, (x, y)]; i1w_grad (B,2,H,W) warped
    I1 gradient; grad, rho_c (B,1,H,W). Pairs with live False keep their u and p. Returns u, p and the
    per-pair sum of squared u changes (float64, B).

    Every output of a pair depends on that pair's inputs only, bit for bit, whatever else is in the
    batch: all ops are elementwise except the error sum, which is summed in int64 fixed point
    (`_error_fixed_point`) because integer addition is associative. A floating-point sum is not, and
    torch picks its summation order from the tensor's shape and device, so a float error could
    cross epsilon in one batch and not in another and stop the pair one iteration apart.
    """
    # thresholding step (estimateV)
    rho = rho_c + (i1w_grad[:, :1] * u[:, :1] + i1w_grad[:, 1:] * u[:, 1:])
    lt_grad = l_t * grad
    fi = torch.where(
        rho < -lt_grad,
        l_t,
        torch.where(rho > lt_grad, -l_t, torch.where(grad > _FLT_EPSILON, -rho / grad.clamp_min(_FLT_EPSILON), 0.0)),
    )
    v = u + fi * i1w_grad

    # divergence of p: backward differences, zero before the first row/column
    px, py = p[:, :, 0], p[:, :, 1]
    div = (px - F.pad(px[..., :-1], (1, 0))) + (py - F.pad(py[..., :-1, :], (0, 0, 1, 0)))

    # estimateU; per pixel du1^2 + du2^2 in float32 as OpenCV, summed exactly in fixed point
    u_new = v + theta * div
    d2 = (u_new - u).square().sum(dim=1)
    units = torch.floor(d2.clamp_max(err_cap) * err_scale).to(torch.int64)
    err = units.flatten(1).sum(dim=1).to(torch.float64) / err_scale

    # forward gradient of u (zero on the last column / row) and the dual update
    ux = F.pad(u_new[..., 1:] - u_new[..., :-1], (0, 1))
    uy = F.pad(u_new[..., 1:, :] - u_new[..., :-1, :], (0, 0, 0, 1))
    norm = 1.0 + taut * torch.sqrt(ux.square() + uy.square())
    p_new = torch.stack(((px + taut * ux) / norm, (py + taut * uy) / norm), dim=2)

    live4 = live.view(-1, 1, 1, 1)
    return torch.where(live4, u_new, u), torch.where(live4[..., None], p_new, p), err


_compiled: dict[str, object] = {}


def make_kernels(compile: bool):
    """(step, median_filter), eager or torch.compile'd (dynamic shapes: one graph for all sizes)."""
    if not compile:
        return _step, median_filter
    if not _compiled:
        _compiled["step"] = torch.compile(_step, dynamic=True)
        window = torch.compile(median_window, dynamic=True)
        _compiled["median"] = functools.partial(median_filter, window=window)
    return _compiled["step"], _compiled["median"]


# ---------------------------------------------------------------------------------------------
# per-level pieces shared by the fixed-batch solver and the continuous scheduler




@dataclass
class TVL1Stats:
    """What a solve cost on the device, counted by `tvl1(stats=...)` and `ContinuousTVL1.stats`.

    steps: batched inner iterations launched, one after the other: the latency-bound cost on a GPU.
    slot_iterations: pair-iterations those launches computed, frozen pairs still in a batch included.
    live_iterations: pair-iterations that were needed (the same for any batching of the same pairs).
    pairs: pairs finished.
    """

    steps: int = 0
    slot_iterations: int = 0
    live_iterations: int = 0
    pairs: int = 0


@dataclass(frozen=True)
class Level:
    """Constants of one pyramid level size, as OpenCV computes them (float32 casts included)."""

    hw: tuple[int, int]
    base_x: torch.Tensor
    base_y: torch.Tensor
    l_t: float
    taut: float
    theta: float
    scaled_eps: float
    err_cap: torch.Tensor  # 0-dim float32: a Python float would make torch.compile specialize per level
    err_scale: torch.Tensor


def make_level(hw: tuple[int, int], device, tau: float, lambda_: float, theta: float, epsilon: float) -> Level:
    h, w = hw
    base_y, base_x = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32), torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    scaled_eps = float(np.float32(epsilon * epsilon * h * w))
    cap, scale = (torch.tensor(v, dtype=torch.float32, device=device) for v in _error_fixed_point(h, w, scaled_eps))
    return Level(hw, base_x, base_y, float(np.float32(lambda_ * theta)), float(np.float32(tau / theta)),
                  float(np.float32(theta)), scaled_eps, cap, scale)


def gradient_stack(i1: torch.Tensor) -> torch.Tensor:
    """(B,3,h,w): I1 and its centered gradient, the three images each warp remaps."""
    i1x, i1y = centered_gradient(i1)
    return torch.stack((i1, i1x, i1y), dim=1)


def warp_terms(i1_stack, i0, u, lv: Level) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Start of a warp (remap + calcGradRho): warped I1 gradient (B,2,h,w), |grad|^2 and rho_c (B,1,h,w)."""
    warped = warp(i1_stack, u, lv.base_x, lv.base_y)
    # a fresh tensor: the compiled step guards on strides, and gathered batches have these
    i1w, i1w_grad = warped[:, :1], torch.stack((warped[:, 1], warped[:, 2]), dim=1)
    grad = i1w_grad.square().sum(dim=1, keepdim=True)
    rho_c = i1w - (i1w_grad[:, :1] * u[:, :1]) - (i1w_grad[:, 1:] * u[:, 1:]) - i0[:, None]
    return i1w_grad, grad, rho_c


def build_pyramid(img: torch.Tensor, sizes: list[tuple[int, int]], scale_step: float) -> list[torch.Tensor]:
    out = [img]
    for hw in sizes[1:]:
        out.append(resize_linear(out[-1], hw, (1 / scale_step, 1 / scale_step)))
    return out


def upsample_flow(u: torch.Tensor, hw: tuple[int, int], scale_step: float) -> torch.Tensor:
    """u of one level to the next finer level `hw`: bilinear resize to the size, times 1 / scale_step."""
    (h, w), (fh, fw) = u.shape[-2:], hw
    return resize_linear(u, (fh, fw), (h / fh, w / fw)) * float(1 / scale_step)


# ---------------------------------------------------------------------------------------------
# fixed batches: all pairs of a batch go through the pyramid together


def _one_scale(i0, i1, u, lv: Level, *, warps, inner_iterations, outer_iterations, median_filtering, kernels,
               stats: TVL1Stats):
    """procOneScale for a batch: returns the refined u (B,2,h,w)."""
    b = i0.shape[0]
    step, median = kernels
    i1_stack = gradient_stack(i1)
    p = torch.zeros(b, 2, 2, *lv.hw, device=i0.device, dtype=torch.float32)

    for _ in range(warps):
        i1w_grad, grad, rho_c = warp_terms(i1_stack, i0, u, lv)

        # working set: indices into the batch, and the tensors the iterations touch
        idx = None
        wu, wp, wg, wgrad, wrho = u, p, i1w_grad, grad, rho_c
        live = torch.ones(b, dtype=torch.bool, device=i0.device)
        n_live = b
        for _outer in range(outer_iterations):
            if median_filtering > 1:
                wu = torch.where(live.view(-1, 1, 1, 1), median(wu, median_filtering), wu)
            for _inner in range(inner_iterations):
                wu, wp, err = step(wu, wp, wg, wgrad, wrho, live, lv.l_t, lv.theta, lv.taut, lv.err_cap, lv.err_scale)
                stats.steps += 1
                stats.slot_iterations += live.numel()
                stats.live_iterations += n_live
                live = live & (err > lv.scaled_eps)
                n_live = int(live.sum())  # the one host sync per iteration
                if n_live == 0:
                    break
                if n_live <= _COMPACT_FRACTION * live.numel():
                    # write finished pairs back, keep iterating only the live ones
                    u, p = _scatter(u, p, idx, wu, wp)
                    keep = live.nonzero().squeeze(1)
                    idx = keep if idx is None else idx[keep]
                    wu, wp, wg, wgrad, wrho = (t[keep] for t in (wu, wp, wg, wgrad, wrho))
                    live = live[keep]
            if n_live == 0:
                break
        u, p = _scatter(u, p, idx, wu, wp)
    return u


def _scatter(u, p, idx, wu, wp):
    if idx is None:
        return wu, wp
    return u.index_copy(0, idx, wu), p.index_copy(0, idx, wp)


def pyramid_sizes(h: int, w: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    for _ in range(1, nscales):
        ph, pw = sizes[-1]
        nh, nw = round(ph * scale_step), round(pw * scale_step)
        if nh < 16 or nw < 16:  # OpenCV drops this level and every coarser one
            break
        sizes.append((nh, nw))
    return sizes


def check_params(p: dict) -> None:
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown TV-L1 parameter(s) {unknown}; the parameters are {sorted(DEFAULTS)}")
    for name in ("tau", "lambda_", "theta", "epsilon"):
        if not p[name] > 0:
            raise ValueError(f"TV-L1 parameter {name} must be > 0, got {p[name]!r}")
    for name in ("nscales", "warps", "inner_iterations", "outer_iterations"):
        if int(p[name]) != p[name] or p[name] < 1:
            raise ValueError(f"TV-L1 parameter {name} must be an integer >= 1, got {p[name]!r}")
    if not 0 < p["scale_step"] < 1:
        raise ValueError(f"TV-L1 parameter scale_step must be in (0, 1), got {p['scale_step']!r}")
    m = p["median_filtering"]
    if int(m) != m or m < 0 or (m > 1 and m % 2 == 0):
        raise ValueError(f"TV-L1 parameter median_filtering must be 0, 1 (off) or an odd kernel size, got {m!r}")


def check_frames(prev, next, what: str, batch: bool) -> None:
    if not isinstance(prev, torch.Tensor) or not isinstance(next, torch.Tensor):
        raise ValueError(f"{what} expects torch tensors, got {type(prev).__name__} and {type(next).__name__}")
    if prev.shape != next.shape:
        raise ValueError(f"{what}: prev and next must have the same shape, got {tuple(prev.shape)} and {tuple(next.shape)}")
    ndims, shape = ((2, 3), "(H,W) or (B,H,W)") if batch else ((2,), "(H,W)")
    if prev.ndim not in ndims or min(prev.shape[-2:]) < 8 or prev.numel() == 0:
        raise ValueError(
            f"{what}: frames must be grayscale {shape} with H, W >= 8{' and B >= 1' if batch else ''},"
            f" got shape {tuple(prev.shape)} (convert color frames to gray first)"
        )
    if prev.device != next.device:
        raise ValueError(f"{what}: prev is on {prev.device} but next is on {next.device}")


def tvl1(
    prev: torch.Tensor,
    next: torch.Tensor,
    *,
    tau: float = 0.25,
    lambda_: float = 0.15,
    theta: float = 0.3,
    nscales: int = 5,
    warps: int = 5,
    epsilon: float = 0.01,
    inner_iterations: int = 30,
    outer_iterations: int = 10,
    scale_step: float = 0.8,
    median_filtering: int = 5,
    compile: bool | None = None,
    stats: TVL1Stats | None = None,
) -> torch.Tensor:
    """TV-L1 flow from `prev` to `next`, like `cv2.optflow.DualTVL1OpticalFlow_create(...).calc`.

    prev, next: (B,H,W) or (H,W) grayscale, uint8 or float on the 0..255 scale, same shape and device.
    Returns float32 flow (B,2,H,W) or (2,H,W) on that device, channel 0 = dx, 1 = dy, such that
    prev(y, x) ~ next(y + dy, x + dx). The batch is solved as one fixed batch (see `ContinuousTVL1`
    for a stream of pairs); each pair's flow is the same, bit for bit, as solving it alone.
    compile: torch.compile the inner iteration; None means only on CUDA (first call pays the compile).
    stats: a TVL1Stats to add this solve's iteration counts to.
    """
    check_frames(prev, next, "tvl1", batch=True)
    params = dict(tau=tau, lambda_=lambda_, theta=theta, nscales=nscales, warps=warps, epsilon=epsilon,
                  inner_iterations=inner_iterations, outer_iterations=outer_iterations, scale_step=scale_step,
                  median_filtering=median_filtering)
    check_params(params)
    loop = dict(warps=warps, inner_iterations=inner_iterations, outer_iterations=outer_iterations,
                median_filtering=median_filtering)
    stats = stats if stats is not None else TVL1Stats()

    single = prev.ndim == 2
    i0 = prev.reshape(-1, *prev.shape[-2:]).to(torch.float32)
    i1 = next.reshape(-1, *next.shape[-2:]).to(torch.float32)
    if compile is None:
        compile = i0.is_cuda
    kernels = make_kernels(compile)

    with torch.no_grad():
        sizes = pyramid_sizes(*i0.shape[-2:], nscales, scale_step)
        i0s, i1s = build_pyramid(i0, sizes, scale_step), build_pyramid(i1, sizes, scale_step)
        u = torch.zeros(i0.shape[0], 2, *sizes[-1], device=i0.device, dtype=torch.float32)
        for s in range(len(sizes) - 1, -1, -1):
            lv = make_level(sizes[s], i0.device, tau, lambda_, theta, epsilon)
            try:
                u_s = _one_scale(i0s[s], i1s[s], u, lv, kernels=kernels, stats=stats, **loop)
            except Exception as e:  # a broken compiler toolchain must not stop flow extraction
                if not compile:
                    raise
                warn_compile(e)
                compile, kernels = False, make_kernels(False)
                u_s = _one_scale(i0s[s], i1s[s], u, lv, kernels=kernels, stats=stats, **loop)
            u = upsample_flow(u_s, sizes[s - 1], scale_step) if s > 0 else u_s
    stats.pairs += i0.shape[0]
    return u[0] if single else u


def warn_compile(e: Exception) -> None:
    warnings.warn(f"torch.compile of the TV-L1 iteration failed ({e!r}); using eager mode", RuntimeWarning)


def calc_flow_numpy(prev_gray: np.ndarray, next_gray: np.ndarray, *, device: str | torch.device = "cpu",
                    **params) -> np.ndarray:
    """Drop-in for OpenCV's `calc`: two HxW uint8 (or 0..255 float) frames -> float32 HxWx2 flow."""
    prev_gray, next_gray = np.asarray(prev_gray), np.asarray(next_gray)
    if prev_gray.shape != next_gray.shape or prev_gray.ndim != 2:
        raise ValueError(
            f"calc_flow_numpy expects two grayscale HxW frames of the same shape, got {prev_gray.shape} and {next_gray.shape}"
        )
    a = torch.from_numpy(np.ascontiguousarray(prev_gray)).to(device)
    b = torch.from_numpy(np.ascontiguousarray(next_gray)).to(device)
    flow = tvl1(a, b, **params)
    return np.ascontiguousarray(flow.permute(1, 2, 0).cpu().numpy(), dtype=np.float32)
