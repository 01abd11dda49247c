"""The fused TV-L1 engine's 5x5 median filter: cv2.medianBlur(u, 5) on float32, bit for bit.

Why not cv2.medianBlur. OpenCV's float 5x5 filter runs a sorting network 8 lanes wide (AVX2);
this one runs the same kind of network as wide as the CPU's vectors, 16 lanes with AVX-512. The
filter runs twice per outer iteration (u1, u2), ~10% of an accurate solve and more of a fast one.

Why the bits are the same. A median is a selection: for 25 ordinary floats (no NaN, no -0.0) the
13th smallest is one value whatever the method, and min/max only move values around. So this
filter equals OpenCV's on any such input, given the same 25 neighbours: BORDER_REPLICATE, as
OpenCV's medianBlur (tests/test_tvl1_fused.py checks against cv2.medianBlur). NaN and -0.0 are
where methods can differ (which of +0.0/-0.0 a min returns depends on operand order); the flow
never holds them (u starts at +0.0 and only sums of non-(-0.0) terms, selections and positive
scalings reach it), but the filter checks anyway and says so, and the caller then uses OpenCV's.

The network: Paeth's/Devillard's 99-comparator median of 25 (N. Devillard, "Fast median search:
an ANSI C implementation", 1998), checked here for every 0/1 input (the 0-1 principle), so for
every input: tests/test_tvl1_fused.py::test_median_network_selects_the_median.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from flowprep.tvl1_kernels import _bits, _jit

NETWORK = (
    (0, 1), (3, 4), (2, 4), (2, 3), (6, 7), (5, 7), (5, 6), (9, 10), (8, 10), (8, 9), (12, 13), (11, 13),
    (11, 12), (15, 16), (14, 16), (14, 15), (18, 19), (17, 19), (17, 18), (21, 22), (20, 22), (20, 21),
    (23, 24), (2, 5), (3, 6), (0, 6), (0, 3), (4, 7), (1, 7), (1, 4), (11, 14), (8, 14), (8, 11), (12, 15),
    (9, 15), (9, 12), (13, 16), (10, 16), (10, 13), (20, 23), (17, 23), (17, 20), (21, 24), (18, 24),
    (18, 21), (19, 22), (8, 17), (9, 18), (0, 18), (0, 9), (10, 19), (1, 19), (1, 10), (11, 20), (2, 20),
    (2, 11), (12, 21), (3, 21), (3, 12), (13, 22), (4, 22), (4, 13), (14, 23), (5, 23), (5, 14), (15, 24),
    (6, 24), (6, 15), (7, 16), (7, 19), (13, 21), (15, 23), (7, 13), (7, 15), (1, 9), (3, 11), (5, 17),
    (11, 17), (9, 17), (4, 10), (6, 12), (7, 14), (4, 6), (4, 7), (12, 14), (10, 14), (6, 7), (10, 12),
    (6, 10), (6, 17), (12, 17), (7, 17), (7, 10), (12, 18), (7, 12), (10, 18), (12, 20), (10, 20), (10, 12),
)
_NEG_ZERO = np.int32(-2147483648)   # the bits of -0.0


@njit(inline="always", **_jit)
def _s(a, b):
    return min(a, b), max(a, b)


@njit(inline="always", **_jit)
def _median25(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19,
              p20, p21, p22, p23, p24):
    """The 13th smallest of 25 values: NETWORK, written out (numba keeps 25 scalars in registers,
    which a list would not), comparators the median does not need pruned away by LLVM."""
    p0, p1 = _s(p0, p1); p3, p4 = _s(p3, p4); p2, p4 = _s(p2, p4); p2, p3 = _s(p2, p3)   # noqa: E702
    p6, p7 = _s(p6, p7); p5, p7 = _s(p5, p7); p5, p6 = _s(p5, p6); p9, p10 = _s(p9, p10)   # noqa: E702
    p8, p10 = _s(p8, p10); p8, p9 = _s(p8, p9); p12, p13 = _s(p12, p13); p11, p13 = _s(p11, p13)   # noqa: E702
    p11, p12 = _s(p11, p12); p15, p16 = _s(p15, p16); p14, p16 = _s(p14, p16); p14, p15 = _s(p14, p15)   # noqa: E702
    p18, p19 = _s(p18, p19); p17, p19 = _s(p17, p19); p17, p18 = _s(p17, p18); p21, p22 = _s(p21, p22)   # noqa: E702
    p20, p22 = _s(p20, p22); p20, p21 = _s(p20, p21); p23, p24 = _s(p23, p24); p2, p5 = _s(p2, p5)   # noqa: E702
    p3, p6 = _s(p3, p6); p0, p6 = _s(p0, p6); p0, p3 = _s(p0, p3); p4, p7 = _s(p4, p7)   # noqa: E702
    p1, p7 = _s(p1, p7); p1, p4 = _s(p1, p4); p11, p14 = _s(p11, p14); p8, p14 = _s(p8, p14)   # noqa: E702
    p8, p11 = _s(p8, p11); p12, p15 = _s(p12, p15); p9, p15 = _s(p9, p15); p9, p12 = _s(p9, p12)   # noqa: E702
    p13, p16 = _s(p13, p16); p10, p16 = _s(p10, p16); p10, p13 = _s(p10, p13); p20, p23 = _s(p20, p23)   # noqa: E702
    p17, p23 = _s(p17, p23); p17, p20 = _s(p17, p20); p21, p24 = _s(p21, p24); p18, p24 = _s(p18, p24)   # noqa: E702
    p18, p21 = _s(p18, p21); p19, p22 = _s(p19, p22); p8, p17 = _s(p8, p17); p9, p18 = _s(p9, p18)   # noqa: E702
    p0, p18 = _s(p0, p18); p0, p9 = _s(p0, p9); p10, p19 = _s(p10, p19); p1, p19 = _s(p1, p19)   # noqa: E702
    p1, p10 = _s(p1, p10); p11, p20 = _s(p11, p20); p2, p20 = _s(p2, p20); p2, p11 = _s(p2, p11)   # noqa: E702
    p12, p21 = _s(p12, p21); p3, p21 = _s(p3, p21); p3, p12 = _s(p3, p12); p13, p22 = _s(p13, p22)   # noqa: E702
    p4, p22 = _s(p4, p22); p4, p13 = _s(p4, p13); p14, p23 = _s(p14, p23); p5, p23 = _s(p5, p23)   # noqa: E702
    p5, p14 = _s(p5, p14); p15, p24 = _s(p15, p24); p6, p24 = _s(p6, p24); p6, p15 = _s(p6, p15)   # noqa: E702
    p7, p16 = _s(p7, p16); p7, p19 = _s(p7, p19); p13, p21 = _s(p13, p21); p15, p23 = _s(p15, p23)   # noqa: E702
    p7, p13 = _s(p7, p13); p7, p15 = _s(p7, p15); p1, p9 = _s(p1, p9); p3, p11 = _s(p3, p11)   # noqa: E702
    p5, p17 = _s(p5, p17); p11, p17 = _s(p11, p17); p9, p17 = _s(p9, p17); p4, p10 = _s(p4, p10)   # noqa: E702
    p6, p12 = _s(p6, p12); p7, p14 = _s(p7, p14); p4, p6 = _s(p4, p6); p4, p7 = _s(p4, p7)   # noqa: E702
    p12, p14 = _s(p12, p14); p10, p14 = _s(p10, p14); p6, p7 = _s(p6, p7); p10, p12 = _s(p10, p12)   # noqa: E702
    p6, p10 = _s(p6, p10); p6, p17 = _s(p6, p17); p12, p17 = _s(p12, p17); p7, p17 = _s(p7, p17)   # noqa: E702
    p7, p10 = _s(p7, p10); p12, p18 = _s(p12, p18); p7, p12 = _s(p7, p12); p10, p18 = _s(p10, p18)   # noqa: E702
    p12, p20 = _s(p12, p20); p10, p20 = _s(p10, p20); p10, p12 = _s(p10, p12)   # noqa: E702
    return p12


@njit(**_jit)
def median5(src, dst, padded):
    """dst = the 5x5 median of src with replicated borders (OpenCV's medianBlur(src, 5)), using
    padded, (H+4) x (W+4) float32, for the bordered copy. Returns False, with dst unspecified,
    when src holds a NaN or a -0.0 (use cv2.medianBlur then)."""
    H, W = src.shape
    odd = False
    for y in range(H + 4):
        S = src[min(max(y - 2, 0), H - 1)]
        P = padded[y]
        for x in range(W):
            v = S[x]
            P[x + 2] = v
            odd |= (v != v) | (_bits(v) == _NEG_ZERO)
        P[0] = S[0]
        P[1] = S[0]
        P[W + 2] = S[W - 1]
        P[W + 3] = S[W - 1]
    if odd:
        return False
    for y in range(H):
        R0 = padded[y]
        R1 = padded[y + 1]
        R2 = padded[y + 2]
        R3 = padded[y + 3]
        R4 = padded[y + 4]
        D = dst[y]
        for x in range(W):
            D[x] = _median25(R0[x], R0[x + 1], R0[x + 2], R0[x + 3], R0[x + 4],
                             R1[x], R1[x + 1], R1[x + 2], R1[x + 3], R1[x + 4],
                             R2[x], R2[x + 1], R2[x + 2], R2[x + 3], R2[x + 4],
                             R3[x], R3[x + 1], R3[x + 2], R3[x + 3], R3[x + 4],
                             R4[x], R4[x + 1], R4[x + 2], R4[x + 3], R4[x + 4])
    return not odd
