"""Fused CPU TV-L1: OpenCV's `cv2.optflow.DualTVL1OpticalFlow`, bit for bit, several times faster.

Contract. `FusedTVL1(params).calc(prev, next)` returns exactly (np.array_equal, every float32 bit)
what `flowprep.flow.opencv_tvl1(params).calc(prev, next, None)` returns for a fresh OpenCV object
(or the one object per frame size flowprep.flow keeps, which is the same thing), on uint8
grayscale frames, gamma = 0, no initial flow. Bit identity, not closeness, is the point: a store
extracted with this engine is the store OpenCV would have written, so results, caches and
published numbers stay comparable, and the tests can demand equality instead of tolerances.
`unsupported(params, shape)` says (None, or a sentence why not) whether that holds for given
parameters and frame size on this machine; callers fall back to OpenCV and record the reason.

Why it is faster. Per inner iteration OpenCV makes eight passes over the image (estimateV, two
divergences, estimateU, two forward gradients, estimateDualVariables), scalar code in
parallel_for_ bodies. Here one numba-compiled, vectorised sweep per iteration does all of it,
pipelined by rows (flowprep/tvl1_kernels.py): V, divergence and U of row y, then the gradient and
dual update of row y-1; OpenCV's double-precision hypot becomes float32 arithmetic, so the loops
run as wide as the CPU's vectors (512 bits where it has them). Per warp, the three bicubic
remaps (I1, I1x, I1y) share one set of weights per pixel, gather 16 pixels at a time
(flowprep/tvl1_warp.py) and are fused with the flow map and calcGradRho's rho_c; its grad
(I1wx^2 + I1wy^2, the same float operations) is recomputed in the sweep, cheaper than reading
it from memory. The 5x5 median filter is a 16-lane sorting network (flowprep/tvl1_median.py).
The pyramid and the flow's resizing are OpenCV's own (cv2.resize), so they match by construction.

How it stays bit-identical. Every float32 operation is OpenCV's, in OpenCV's order (fastmath off,
float32 constants, no FMA contraction). Facts that matter, each checked by the tests:
- uint8 input converts with scale 1; the pyramid stops below 16 rows or columns; p is reset per
  scale; the divergence's first column associates as (p11 + p12) - p12[y-1]; the gradient is
  centred 0.5f*(a - b), one-sided at the borders; the flow upsampling multiplies in double (in
  float32 where that rounds the same: a float32 factor, whose product with a float is exact).
- A median selects: on floats without NaN or -0.0 (the flow has neither; the filter checks and
  hands any such input to cv2.medianBlur) every exact method returns OpenCV's value.
- OpenCV 5.0's remap(INTER_CUBIC) with float maps uses the float fraction (no 1/32 fixed-point
  table) and, on a CPU with AVX2, FMAs in a specific order; without AVX2 it uses plain mul/add.
  The warp kernel reproduces whichever of the two this OpenCV uses (probed once per process).
- The dual update calls libm's double hypot on float arguments. The kernel computes the float
  nearest to the exact sqrt(a^2 + b^2) in float32 arithmetic (FMA residues, a rounding-midpoint
  test), which is libm's rounded result except within a hair of a float rounding midpoint; those
  pixels (a few in a million) get libm's hypot itself.
- estimateU sums the error terms serially in float32 and stops when that sum is not > epsilon.
  The kernel sums the same terms per column in float32 (vectorised, per band of rows), adds the
  column sums in double, and decides from a strict bound on both sums' rounding error; in the
  rare iterations where the bound cannot decide, it computes OpenCV's exact serial float sum. So threads > 1 (bands of rows
  in parallel) give the same bits as threads = 1.
- x86-64 only: OpenCV's wheel is built for SSE3 with AVX2/FMA3 dispatch and its TV-L1 file has no
  FMA; an ARM or -mfma build of OpenCV rounds differently, so there is nothing to match.

Threads. threads = 1 runs plain compiled loops and never starts numba's threading layer: the way
to use every core is one engine per worker process, as flowprep's extraction does. threads > 1
runs bands of rows on numba's threading layer (OpenMP where numba finds libgomp, TBB if
installed; the `workqueue` fallback must not be entered from two threads at once), with two
barriers per inner iteration: worth it on idle cores only, it crawls when the cores are busy
with other work. GNU OpenMP does not survive fork(): fork workers before using threads > 1.

Compilation. Kernels are compiled on first use (or by `warm_up`) and cached on disk by numba
(`cache=True`): in flowprep/__pycache__ when that is writable, else numba's user-wide cache
directory; NUMBA_CACHE_DIR overrides. Each cache file is written under a temporary name and
renamed into place, so processes compiling at the same time (Ray or joblib workers) cannot leave
a torn file; at worst each compiles once. Importing this module compiles nothing.
"""
from __future__ import annotations

import math
import platform
import time
from functools import lru_cache

import cv2
import numpy as np

from flowprep.presets import ACCURATE

F32 = np.float32
# OpenCV's DualTVL1 defaults (the accurate preset, plus the two settings no preset changes);
# missing parameters take these.
OPENCV_DEFAULTS = dict(ACCURATE, gamma=0.0, use_initial_flow=False)
_MIN_SIDE = 3   # below 3 rows or columns OpenCV's centred gradient reads outside the image
_CPU_AVX2 = 11  # cv::CPU_AVX2


def _full(params: dict) -> dict:
    unknown = set(params) - set(OPENCV_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown TV-L1 parameters: {', '.join(sorted(unknown))}")
    return dict(OPENCV_DEFAULTS, **params)


def _param_problem(p: dict) -> str | None:
    if p["gamma"] != 0:
        return f"gamma = {p['gamma']} (the fused engine implements gamma = 0 only)"
    if p["use_initial_flow"]:
        return "use_initial_flow is set (the fused engine starts from zero flow only)"
    ints = ("nscales", "warps", "inner_iterations", "outer_iterations", "median_filtering")
    try:
        bad = [k for k in ints if int(p[k]) != p[k]] + [k for k in ("tau", "lambda_", "theta", "epsilon", "scale_step")
                                                        if float(p[k]) != p[k]]
    except (TypeError, ValueError):
        return "non-numeric parameters"
    if bad:
        return "non-integer " + ", ".join(bad)
    if p["nscales"] < 1:
        return f"nscales = {p['nscales']} (OpenCV needs at least 1)"
    if p["median_filtering"] not in (0, 1, 3, 5):
        return f"median_filtering = {p['median_filtering']} (OpenCV's float median takes 3 or 5; 0, 1 = off)"
    if not 0 < p["scale_step"] <= 1:
        return f"scale_step = {p['scale_step']} (supported: 0 < scale_step <= 1)"
    for k in ("tau", "lambda_", "theta", "epsilon"):
        if not (math.isfinite(p[k]) and p[k] > 0):
            return f"{k} = {p[k]} (supported: finite and > 0)"
    return None


@lru_cache(maxsize=1)
def _machine_problem() -> str | None:
    """Reasons this machine's OpenCV cannot be matched (checked once per process)."""
    arch = platform.machine().lower()
    if arch not in ("x86_64", "amd64"):
        return (f"not an x86-64 machine ({platform.machine()}): bit identity holds against OpenCV's "
                "x86-64 wheels only (other builds fuse multiply-adds differently)")
    if not hasattr(cv2, "optflow"):
        return "OpenCV has no optflow module (opencv-contrib) to be identical to"
    if not cv2.__version__.startswith("5.0"):
        return f"OpenCV {cv2.__version__}: the fused engine reproduces OpenCV 5.0's arithmetic only"
    if remap_variant() is None:
        return (f"this OpenCV's ({cv2.__version__}) cv2.remap(INTER_CUBIC) matches neither cubic model "
                "the fused warp implements (OpenCV 5.0 with or without AVX2)")
    if not _hypot_model_holds():
        return "this libm's hypot does not round like the fused kernel's model"
    return None


def unsupported(params: dict, shape: tuple[int, int]) -> str | None:
    """None when FusedTVL1(params) gives OpenCV's flow bit for bit for frames of `shape` (H, W)
    on this machine; else a sentence saying why not (the caller falls back to OpenCV)."""
    try:
        p = _full(params)
    except ValueError as e:
        return str(e)
    reason = _param_problem(p)
    if reason:
        return reason
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < _MIN_SIDE:
        return (f"frames of {w}x{h} are below {_MIN_SIDE} pixels on a side, where OpenCV's centred "
                "gradient reads outside the image")
    if max(h, w) >= 32767:
        return f"frames of {w}x{h}: OpenCV's remap takes fewer than 32767 pixels a side"
    return _machine_problem()


# ---------------------------------------------------------------------------------------------
# Probes of the two machine-dependent pieces, in numpy (no compilation): which cubic remap this
# OpenCV runs, and whether libm's hypot rounds like sqrt of the double sum.


def _fma32(a, b, c):
    """float32 a*b + c rounded once. a*b is exact in double; rounding the double sum to float
    could round twice, so a sum that lands exactly on a float midpoint is settled by its error."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)                       # s + err == p + c exactly (TwoSum)
    r = s.astype(F32)
    rd = r.astype(np.float64)
    other = np.where(rd < s, np.nextafter(r, F32(np.inf)), np.nextafter(r, F32(-np.inf)))
    tie = (s == (rd + other.astype(np.float64)) / 2) & (err != 0)
    up = np.maximum(r, other)
    down = np.minimum(r, other)
    return np.where(tie, np.where(err > 0, up, down), r).astype(F32)


def _remap_model(src: np.ndarray, mx: np.ndarray, my: np.ndarray, use_fma: bool) -> np.ndarray:
    """The cubic remap of flowprep/tvl1_warp.py in numpy, for probing and for the tests."""
    h, w = src.shape
    pad = 4
    S = np.zeros((h + 2 * pad, w + 2 * pad), F32)
    S[pad:-pad, pad:-pad] = src
    inside = (mx >= -2) & (mx < w + 1) & (my >= -2) & (my < h + 1)
    sx = np.where(inside, mx, 0).astype(F32)
    sy = np.where(inside, my, 0).astype(F32)
    fx, fy = np.floor(sx), np.floor(sy)

    def coeffs(t):
        one, a = F32(1), F32(-0.75)
        u, t2 = one - t, t * t
        c0 = a * (t * (u * u))
        c3 = a * (u * t2)
        if use_fma:
            c1 = _fma32(_fma32(np.full_like(t, 1.25), t, np.full_like(t, -2.25)), t2, np.full_like(t, 1))
        else:
            c1 = (F32(1.25) * t + F32(-2.25)) * t2 + one
        c2 = ((one - c0) - c1) - c3
        return c0, c1, c2, c3

    def dot4(p, c):
        if use_fma:
            return _fma32(p[3], c[3], _fma32(p[2], c[2], _fma32(p[1], c[1], p[0] * c[0])))
        return ((p[0] * c[0] + p[1] * c[1]) + p[2] * c[2]) + p[3] * c[3]

    cx, cy = coeffs((sx - fx).astype(F32)), coeffs((sy - fy).astype(F32))
    ix, iy = fx.astype(np.int64) - 1 + pad, fy.astype(np.int64) - 1 + pad
    rows = [dot4([S[iy + i, ix + j] for j in range(4)], cx) for i in range(4)]
    return np.where(inside, dot4(rows, cy), F32(0)).astype(F32)


@lru_cache(maxsize=1)
def remap_variant() -> bool | None:
    """True: this OpenCV's cubic remap uses the FMA (AVX2) model; False: the plain one; None: neither."""
    rng = np.random.default_rng(12345)
    h, w = 23, 31
    src = (rng.random((h, w)) * 255).astype(F32)
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    mx = (xx + rng.standard_normal((h, w)) * 2.5).astype(F32)
    my = (yy + rng.standard_normal((h, w)) * 2.5).astype(F32)
    ref = cv2.remap(src, mx, my, cv2.INTER_CUBIC)
    preferred = bool(cv2.checkHardwareSupport(_CPU_AVX2))
    for use_fma in (preferred, not preferred):
        if np.array_equal(ref, _remap_model(src, mx, my, use_fma)):
            return use_fma
    return None


@lru_cache(maxsize=1)
def _hypot_model_holds() -> bool:
    """libm's hypot (which OpenCV's dual update calls) rounds to the float nearest the exact
    result, as the kernel's model does, on a fixed probe away from float midpoints (sqrt of the
    exact double sum of squares stands for the exact result there; the kernel sends pixels near
    a midpoint to libm itself)."""
    rng = np.random.default_rng(6789)
    a = (rng.standard_normal(4096) * 10.0 ** rng.uniform(-6, 2, 4096)).astype(F32).astype(np.float64)
    b = (rng.standard_normal(4096) * 10.0 ** rng.uniform(-6, 2, 4096)).astype(F32).astype(np.float64)
    return bool(np.array_equal(np.hypot(a, b).astype(F32), np.sqrt(a * a + b * b).astype(F32)))


def _gamma(n: int, rows: int) -> float:
    """Relative bound used by the error decision (see tvl1_kernels._decide) for n terms whose
    float32 column sums have at most `rows` terms each."""
    k, r = n - 1, rows - 1
    if k * 2.0 ** -24 >= 0.25:
        return math.inf   # too many terms for a useful bound: always the exact serial sum
    gf = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)   # OpenCV's serial float sum
    gc = r * 2.0 ** -24 / (1 - r * 2.0 ** -24)   # a column's float sum
    gd = k * 2.0 ** -53 / (1 - k * 2.0 ** -53)   # the double sum of the column sums
    return 2.0 * (gf + gc + gd) + 1e-12


class _Level:
    """Work buffers of one pyramid level, reused from pair to pair."""

    def __init__(self, h: int, w: int, bands: int, pad: int):
        e = lambda *s: np.empty(s, F32)  # noqa: E731
        self.S = e(3, h + 2 * pad, w + 2 * pad)
        self.pairs = e(h + 2 * pad, w + 2 * pad, 2)   # S[0], S[1] interleaved, for the warp's gathers
        self.I1wx, self.I1wy, self.rho_c, self.terms = (e(h, w) for _ in range(4))
        self.p = [e(h, w) for _ in range(4)]
        self.spare = [e(h, w), e(h, w)]   # the median filter's outputs, swapped with u1, u2
        self.bordered = e(h + 4, w + 4)     # the 5x5 median's input with replicated borders
        self.zrow = np.zeros(w, F32)
        self.colsum = np.empty((bands, w), F32)   # per band, the float32 sum of each column
        self.scratch = e(bands, 4, w)   # a dual row's old p where libm decides a norm
        self.gamma = _gamma(h * w, h)


def _median(u: np.ndarray, out: np.ndarray, k: int, bordered: np.ndarray) -> None:
    """OpenCV's medianBlur(u, k) into out: the engine's own 5x5 filter (flowprep/tvl1_median.py,
    the same bits, faster), OpenCV's for 3x3 and for the inputs the own one declines."""
    if k == 5:
        from flowprep.tvl1_median import median5
        if median5(u, out, bordered):
            return
    cv2.medianBlur(u, k, dst=out)


def _upscaled(u: np.ndarray, size: tuple[int, int], k: float) -> np.ndarray:
    """OpenCV's flow upsampling: resize, then multiply by k in double and round to float. When k
    is a float32 (1.25 for scale_step 0.8, 2 for 0.5) the double product of two floats is exact,
    so the float32 product, in place, rounds to the same value."""
    r = cv2.resize(u, size, interpolation=cv2.INTER_LINEAR)
    if float(F32(k)) == k:
        r *= F32(k)
        return r
    return (r.astype(np.float64) * k).astype(F32)


class FusedTVL1:
    """OpenCV's Dual TV-L1 (flowprep parameter names; missing ones are OpenCV's defaults),
    bit-identical to cv2.optflow.DualTVL1OpticalFlow where `unsupported` returns None.

    threads = 1: one core, no threading machinery at all. threads > 1: bands of rows of one pair
    in parallel (numba prange on its threading layer, OpenMP here); same bits. Use one object per
    thread; an object holds work buffers per frame size."""

    def __init__(self, params: dict, threads: int = 1):
        self.params = _full(params)
        reason = _param_problem(self.params)
        if reason:
            raise ValueError(f"FusedTVL1 does not support these parameters: {reason}")
        self.threads = max(1, int(threads))
        self._levels: dict[tuple[int, int], _Level] = {}
        self._supported: set[tuple[int, int]] = set()   # frame shapes `unsupported` passed
        self.stats = np.zeros(3, np.int64)   # inner iterations, exact error sums, libm hypot pixels

    def calc(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Flow from prev to nxt (uint8 HxW grayscale, same shape) -> float32 HxWx2 (x, y)."""
        if prev.dtype != np.uint8 or nxt.dtype != np.uint8 or prev.ndim != 2 or prev.shape != nxt.shape:
            raise ValueError("FusedTVL1.calc takes two uint8 grayscale frames of one shape, got "
                             f"{prev.dtype}{prev.shape} and {nxt.dtype}{nxt.shape}")
        if prev.shape not in self._supported:   # checked once per frame size, not per pair
            reason = unsupported(self.params, prev.shape)
            if reason:
                raise ValueError(f"FusedTVL1 cannot match OpenCV here: {reason}")
            self._supported.add(prev.shape)
        from flowprep import tvl1_kernels as K   # numba loads (or compiles) on first use only
        from flowprep import tvl1_warp as W

        p = self.params
        step = float(p["scale_step"])
        I0s, I1s = [prev.astype(F32)], [nxt.astype(F32)]   # OpenCV: uint8 converts with scale 1
        for _ in range(1, int(p["nscales"])):
            a = cv2.resize(I0s[-1], None, fx=step, fy=step, interpolation=cv2.INTER_LINEAR)
            if a.shape[0] < 16 or a.shape[1] < 16:
                break   # OpenCV lowers nscales here
            I0s.append(a)
            I1s.append(cv2.resize(I1s[-1], None, fx=step, fy=step, interpolation=cv2.INTER_LINEAR))
        par = self.threads > 1
        if par:
            import numba
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        use_fma = remap_variant()
        l_t, taut, theta = F32(p["lambda_"] * p["theta"]), F32(p["tau"] / p["theta"]), F32(p["theta"])
        median = int(p["median_filtering"])
        u1 = np.zeros(I0s[-1].shape, F32)
        u2 = np.zeros(I0s[-1].shape, F32)
        for s in range(len(I0s) - 1, -1, -1):
            I0 = I0s[s]
            h, w = I0.shape
            nb = min(self.threads, h)
            lv = self._levels.get((h, w))
            if lv is None:
                lv = self._levels[(h, w)] = _Level(h, w, nb, W.PAD)
            eps = F32(p["epsilon"] * p["epsilon"] * (h * w))   # OpenCV: (float)(epsilon * epsilon * area)
            W.centered_gradient_padded(I1s[s], lv.S, lv.pairs)
            for q in lv.p:
                q[:] = 0   # OpenCV resets p per scale, not per warp
            bands = np.linspace(0, h, nb + 1).round().astype(np.int64) if par else None
            for _ in range(int(p["warps"])):
                if par:
                    W.warp_parallel(bands, I0, lv.S, lv.pairs, u1, u2, lv.I1wx, lv.I1wy, lv.rho_c, use_fma)
                else:
                    W.warp_rows(0, h, I0, lv.S, lv.pairs, u1, u2, lv.I1wx, lv.I1wy, lv.rho_c, use_fma)
                more = True   # OpenCV: error = FLT_MAX per warp
                for _ in range(int(p["outer_iterations"])):
                    if not more:
                        break
                    if median > 1:   # OpenCV filters in place: into a spare plane, then swap
                        m1, m2 = lv.spare
                        _median(u1, m1, median, lv.bordered)
                        _median(u2, m2, median, lv.bordered)
                        lv.spare = [u1, u2]
                        u1, u2 = m1, m2
                    args = (lv.I1wx, lv.I1wy, lv.rho_c, u1, u2, *lv.p, lv.zrow, lv.terms)
                    if par:
                        more = K.inner_parallel(bands, *args, lv.colsum, lv.scratch, l_t, theta, taut, eps, lv.gamma,
                                                int(p["inner_iterations"]), self.stats)
                    else:
                        more = K.inner_serial(*args, lv.colsum, lv.scratch[0], l_t, theta, taut, eps, lv.gamma,
                                              int(p["inner_iterations"]), self.stats)
            if s == 0:
                break
            hs, ws = I0s[s - 1].shape
            # OpenCV: resize to the finer size, then multiply by 1/scale_step (a double Scalar).
            u1 = _upscaled(u1, (ws, hs), 1.0 / step)
            u2 = _upscaled(u2, (ws, hs), 1.0 / step)
        return cv2.merge([u1, u2])   # HxWx2, as np.dstack, SIMD-fast


def warm_up(threads: int = 1) -> float:
    """Compile (or load from numba's on-disk cache) every kernel FusedTVL1(threads) runs; seconds."""
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    a = (rng.random((20, 24)) * 255).astype(np.uint8)
    b = np.roll(a, 1, axis=1)
    params = dict(nscales=1, warps=1, inner_iterations=2, outer_iterations=1)
    if unsupported(params, a.shape) is None:
        FusedTVL1(params, threads=1).calc(a, b)
        if threads > 1:
            FusedTVL1(params, threads=threads).calc(a, b)
    return time.perf_counter() - t
