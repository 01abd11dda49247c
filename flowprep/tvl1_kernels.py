"""Numba kernels of the fused TV-L1 engine's inner iteration (the warp is in flowprep/tvl1_warp.py,
the median in flowprep/tvl1_median.py); flowprep/tvl1_fused.py holds the contract and the driver.

Every kernel repeats the float32 arithmetic of the OpenCV 5.0 code it replaces, operation for
operation: fastmath off (so LLVM contracts nothing into FMAs and reassociates nothing), every
constant np.float32 (a bare Python float would turn the expression into float64), and
error_model="numpy" (Python's model adds a division-by-zero branch that stops vectorisation). The
only FMAs are the explicit `_fma` calls: where OpenCV's own AVX2 remap code has them (in
flowprep/tvl1_warp.py), and in the hypot model, where they compute exact residues (not OpenCV's
arithmetic, but its result). numba's on-disk cache keys each compiled function on its own file:
the warp and the median use `_jit`, `_fma` and `_bits` from here, so after changing those, touch
tvl1_warp.py and tvl1_median.py too (or clear the cache).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

# 512-bit vectors where the CPU has them. LLVM's tuning for recent Xeons prefers 256-bit ones,
# which halves the lanes of these loops (10% of a whole solve on this project's Xeon). Lanes are
# independent (fastmath off), so results cannot change; numba keys its on-disk cache by these
# features; a user's own NUMBA_CPU_NAME / NUMBA_CPU_FEATURES wins. Takes effect if nothing in the
# process has compiled with numba yet (else the kernels run 256 bits wide: the same bits).
if numba.config.CPU_FEATURES is None and numba.config.CPU_NAME is None:
    numba.config.CPU_FEATURES = llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"

F32 = np.float32
_ONE = F32(1.0)
_HALF = F32(0.5)
_ZERO = F32(0.0)
_FLT_EPSILON = F32(1.1920928955078125e-07)

_jit = dict(cache=True, nogil=True, error_model="numpy", fastmath=False, boundscheck=False)


@intrinsic
def _fma(typingctx, a, b, c):
    """a*b + c in float32 with one rounding (llvm.fma: vfmadd on x86-64 with FMA3)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        f32 = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


# ---------------------------------------------------------------------------------------------
# The fused inner iteration. OpenCV makes 8 passes over the image (estimateV, 2x divergence,
# estimateU, 2x forwardGradient, estimateDualVariables). Here one sweep does, for each row y:
# V, divergence and U of row y (reading the old p of rows y and y-1), then the gradient and dual
# update of row y-1 (its old p was just read for the last time; its gradient needs the new u of
# row y). Each pixel sees exactly the values it sees in OpenCV.


@njit(inline="always", **_jit)
def _v(rho_c, ix_, iy_, g, u1k, u2k, l_t, nl_t):
    """estimateV of one pixel: v = u + d, with OpenCV's three-way threshold. g is calcGradRho's
    grad, I1wx^2 + I1wy^2 in its order, recomputed (3 operations) instead of read from a plane."""
    rho = rho_c + (ix_ * u1k + iy_ * u2k)
    fi = -rho / g
    c1 = rho < nl_t * g
    c2 = rho > l_t * g
    c3 = g > _FLT_EPSILON
    d1 = l_t * ix_ if c1 else (nl_t * ix_ if c2 else (fi * ix_ if c3 else _ZERO))
    d2 = l_t * iy_ if c1 else (nl_t * iy_ if c2 else (fi * iy_ if c3 else _ZERO))
    return u1k + d1, u2k + d2


@njit(inline="always", **_jit)
def _vdu_row(y, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, p12m, p22m, terms, colsum, l_t, theta):
    """estimateV + divergence + estimateU of row y, given p12m, p22m: rows y-1 of p12 and p22
    (zeros for row 0: (a - b) + (c - 0) == (a - b) + c). terms[y] = the row's error terms (kept
    for the exact serial sum); colsum accumulates them per column in float32, in the same
    vectorised loop (a running sum along the row would not vectorise; the decision bounds its
    rounding)."""
    W = u1.shape[1]
    nl_t = -l_t
    Ix = I1wx[y]
    Iy = I1wy[y]
    R = rho_c[y]
    U1 = u1[y]
    U2 = u2[y]
    P11 = p11[y]
    P12 = p12[y]
    P21 = p21[y]
    P22 = p22[y]
    T = terms[y]
    C = colsum
    # x = 0: OpenCV's first column associates as (p11 + p12) - p12[y-1]
    u1k = U1[0]
    u2k = U2[0]
    v1, v2 = _v(R[0], Ix[0], Iy[0], Ix[0] * Ix[0] + Iy[0] * Iy[0], u1k, u2k, l_t, nl_t)
    n1 = v1 + theta * ((P11[0] + P12[0]) - p12m[0])
    n2 = v2 + theta * ((P21[0] + P22[0]) - p22m[0])
    U1[0] = n1
    U2[0] = n2
    e1 = n1 - u1k
    e2 = n2 - u2k
    t = e1 * e1 + e2 * e2
    T[0] = t
    C[0] += t
    for x in range(1, W):
        u1k = U1[x]
        u2k = U2[x]
        v1, v2 = _v(R[x], Ix[x], Iy[x], Ix[x] * Ix[x] + Iy[x] * Iy[x], u1k, u2k, l_t, nl_t)
        n1 = v1 + theta * ((P11[x] - P11[x - 1]) + (P12[x] - p12m[x]))
        n2 = v2 + theta * ((P21[x] - P21[x - 1]) + (P22[x] - p22m[x]))
        U1[x] = n1
        U2[x] = n2
        e1 = n1 - u1k
        e2 = n2 - u2k
        t = e1 * e1 + e2 * e2
        T[x] = t
        C[x] += t


_TOL = F32(2.0 ** -19)
_ULP = F32(2.0 ** -23)
_TINY = F32(2.0 ** -30)
_HUGE = F32(2.0 ** 60)
_EXP = np.int32(0x7F800000)
_MANT = np.int32(0x007FFFFF)


@intrinsic
def _bits(typingctx, x):
    """The int32 bit pattern of a float32 (a no-op in registers; vectorises)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _float(typingctx, i):
    """The float32 with the bit pattern of an integer's low 32 bits."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], ir.IntType(32)) if i.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())
    return types.float32(i), codegen


@njit(inline="always", **_jit)
def _hyp(a, b):
    """OpenCV's (float)hypot(double(a), double(b)), and whether libm must decide it, in float32
    arithmetic alone (as many lanes a vector as floats; no double square root).

    S = a^2 + b^2 exactly is sh + e + pl + ql (FMA residues of the squares, TwoSum of their sum),
    sl ~ e + pl + ql. r0 = sqrt(sh) is within 1.5 float spacings u of sqrt(S) (|S - sh| <= 2^-23 sh),
    so the answer is r0 or a neighbour. With u = 2^(exponent(r0) - 23), the spacing above r0 (and
    below it unless r0 is a power of two), sqrt(S) passes the midpoint r0 +- u/2 iff D = S - r0^2
    passes +-(r0*u + u^2/4). t = (sh - r0^2, exact by FMA) + sl is D to within about 2^-21 r0*u, so
    m = |t| - r0*u picks r0 (m < 0) or the neighbour on t's side (m > 0). libm decides, as OpenCV
    calls it, when m is within 2^-19 r0*u of 0 (near a midpoint: glibc's double hypot, within an
    ulp of double, rounds to float the other way only within 2^-27 r0*u of it), when r0 is a power
    of two and t < 0 (the spacing below is u/2), and when r0 is outside [2^-30, 2^60) but a or b is
    not 0 (subnormal residues, overflow, inf, NaN). a = b = 0 gives 0 unflagged.
    tests/test_tvl1_fused.py checks flagged-or-equal against libm on random, near-midpoint and
    near-power-of-two pairs."""
    ph = a * a
    pl = _fma(a, a, -ph)
    qh = b * b
    ql = _fma(b, b, -qh)
    sh = ph + qh
    bb = sh - ph
    e = (ph - (sh - bb)) + (qh - bb)
    sl = (e + pl) + ql
    r0 = np.sqrt(sh)
    t = _fma(-r0, r0, sh) + sl
    rb = _bits(r0)
    u = _float(rb & _EXP) * _ULP          # exact: a power of two times a power of two
    thr = r0 * u                          # exact for the same reason (r0 normal here, else flagged)
    m = np.abs(t) - thr
    c = r0 + np.copysign(u, t) if m > _ZERO else r0
    flag = ((np.abs(m) < thr * _TOL) | ((t < _ZERO) & ((rb & _MANT) == 0))
            | ((r0 < _TINY) & ((a != _ZERO) | (b != _ZERO))) | ~(r0 < _HUGE))
    return c, flag


@njit(**_jit)
def hypot_model(a, b, out, flags):
    """_hyp over arrays (for the tests)."""
    for i in range(a.shape[0]):
        out[i], flags[i] = _hyp(a[i], b[i])


@njit(inline="always", **_jit)
def _dual_px(u1x, u1y, u2x, u2y, p11, p12, p21, p22, taut):
    """estimateDualVariables of one pixel: its new p, and whether libm must decide a norm.
    (Scalars only: array arguments would cost reference counting per pixel.)"""
    g1, h1 = _hyp(u1x, u1y)
    g2, h2 = _hyp(u2x, u2y)
    ng1 = _ONE + taut * g1
    ng2 = _ONE + taut * g2
    return ((p11 + taut * u1x) / ng1, (p12 + taut * u1y) / ng1, (p21 + taut * u2x) / ng2,
            (p22 + taut * u2y) / ng2, h1 | h2)


@njit(inline="always", **_jit)
def _dual_row(y, yn, u1, u2, p11, p12, p21, p22, scratch, taut):
    """forwardGradient + estimateDualVariables of row y (u of rows y and yn already new; yn is
    y + 1, or y itself for the last row: OpenCV's zero dy there), in one loop that LLVM
    vectorises at full width. Where the float32 hypot model cannot decide a norm
    (a few pixels in a million), that pixel's old p goes to scratch (a masked store), and a
    second, scalar pass over the row redoes those pixels with libm's hypot, as OpenCV calls it.
    Returns the number of such pixels."""
    W = u1.shape[1]
    A1 = u1[y]
    A2 = u2[y]
    B1 = u1[yn]
    B2 = u2[yn]
    P11 = p11[y]
    P12 = p12[y]
    P21 = p21[y]
    P22 = p22[y]
    O11 = scratch[0]
    O12 = scratch[1]
    O21 = scratch[2]
    O22 = scratch[3]
    anybad = False
    for x in range(W - 1):
        a = A1[x]
        b = A2[x]
        n11, n12, n21, n22, bad = _dual_px(A1[x + 1] - a, B1[x] - a, A2[x + 1] - b, B2[x] - b,
                                           P11[x], P12[x], P21[x], P22[x], taut)
        if bad:
            O11[x] = P11[x]
            O12[x] = P12[x]
            O21[x] = P21[x]
            O22[x] = P22[x]
        anybad |= bad
        P11[x] = n11
        P12[x] = n12
        P21[x] = n21
        P22[x] = n22
    x = W - 1   # last column: OpenCV's zero dx
    n11, n12, n21, n22, bad = _dual_px(_ZERO, B1[x] - A1[x], _ZERO, B2[x] - A2[x], P11[x], P12[x], P21[x], P22[x],
                                       taut)
    O11[x] = P11[x]
    O12[x] = P12[x]
    O21[x] = P21[x]
    O22[x] = P22[x]
    anybad |= bad
    P11[x] = n11
    P12[x] = n12
    P21[x] = n21
    P22[x] = n22
    nbad = 0
    if anybad:
        for x in range(W):
            a = A1[x]
            b = A2[x]
            u1x = A1[x + 1] - a if x < W - 1 else _ZERO
            u2x = A2[x + 1] - b if x < W - 1 else _ZERO
            u1y = B1[x] - a
            u2y = B2[x] - b
            h1 = _hyp(u1x, u1y)[1]
            h2 = _hyp(u2x, u2y)[1]
            if h1 | h2:
                nbad += 1
                ng1 = _ONE + taut * F32(math.hypot(np.float64(u1x), np.float64(u1y)))   # libm, as OpenCV
                ng2 = _ONE + taut * F32(math.hypot(np.float64(u2x), np.float64(u2y)))
                P11[x] = (O11[x] + taut * u1x) / ng1
                P12[x] = (O12[x] + taut * u1y) / ng1
                P21[x] = (O21[x] + taut * u2x) / ng2
                P22[x] = (O22[x] + taut * u2y) / ng2
    return nbad


@njit(**_jit)
def serial_error(terms):
    """OpenCV's error: every term added in row-major order to one float32 accumulator."""
    H, W = terms.shape
    e = _ZERO
    for y in range(H):
        for x in range(W):
            e += terms[y, x]
    return e


@njit(inline="always", **_jit)
def _decide(colsum, terms, eps, gamma, stats):
    """Is OpenCV's float32 serial error sum > eps?

    The terms are nonnegative, so OpenCV's serial float sum of n of them and D, the double sum
    of colsums (float32 sums of the columns of each band of rows), are both within a known
    fraction of their exact sum S (tvl1_fused._gamma: n terms in float, a column of up to h terms
    in float, n column sums in double, and a margin). D then decides whenever D*(1 -/+ gamma) is
    clear of eps; only otherwise (about 1 iteration in 1000) is the exact serial float sum
    computed."""
    d = 0.0
    for b in range(colsum.shape[0]):
        for x in range(colsum.shape[1]):
            d += np.float64(colsum[b, x])
    e = np.float64(eps)
    stats[0] += 1
    if d * (1.0 - gamma) > e:
        return True
    if d * (1.0 + gamma) <= e:
        return False
    stats[1] += 1
    return serial_error(terms) > eps


@njit(**_jit)
def inner_decide(colsum, terms, eps, gamma, stats):
    """_decide as a callable kernel (for the tests)."""
    return _decide(colsum, terms, eps, gamma, stats)


@njit(**_jit)
def sweep_rows(y0, y1, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, zrow, terms, colsum,
               scratch, l_t, theta, taut):
    """V/D/U of rows y0 .. y1-1 and the dual update of rows y0 .. y1-2 (row y1-1 waits for the
    new u of row y1). Returns the number of pixels whose norm libm's hypot decided."""
    libm = 0
    if y0 == 0 and y1 > 0:
        _vdu_row(0, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, zrow, zrow, terms, colsum, l_t, theta)
    # Row 0 apart, so that in the loop p12[y - 1] is a plain row of p12: a choice between zrow
    # and p12[y - 1] per row (one array or another) cost 13-16% of an accurate solve in LLVM's
    # code for the rows.
    for y in range(max(y0, 1), y1):
        _vdu_row(y, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, p12[y - 1], p22[y - 1], terms, colsum, l_t,
                 theta)
        if y > y0:
            libm += _dual_row(y - 1, y, u1, u2, p11, p12, p21, p22, scratch, taut)
    return libm


@njit(**_jit)
def dual_row(y, u1, u2, p11, p12, p21, p22, scratch, taut):
    """_dual_row as a callable kernel: the last row's dual update (and the tests')."""
    return _dual_row(y, min(y + 1, u1.shape[0] - 1), u1, u2, p11, p12, p21, p22, scratch, taut)


@njit(**_jit)
def inner_serial(I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, zrow, terms, colsum, scratch,
                 l_t, theta, taut, eps, gamma, n_iter, stats):
    """Up to n_iter fused iterations, stopping as OpenCV does once the error is not > eps.
    Returns whether the last error was still > eps. stats: [iterations, exact sums, libm hypot pixels]."""
    H = u1.shape[0]
    for _ in range(n_iter):
        colsum[:] = _ZERO
        stats[2] += sweep_rows(0, H, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, zrow, terms, colsum[0],
                               scratch, l_t, theta, taut)
        stats[2] += dual_row(H - 1, u1, u2, p11, p12, p21, p22, scratch, taut)
        if not _decide(colsum, terms, eps, gamma, stats):
            return False
    return True


@njit(parallel=True, **_jit)
def inner_parallel(bands, I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22, zrow, terms, colsums, scratches,
                   l_t, theta, taut, eps, gamma, n_iter, stats):
    """inner_serial with bands of rows in parallel. Each band pipelines its own rows: V/D/U of all
    of them, the dual update of all but its last. That last row's dual update needs the next
    band's new u, and the next band's first divergence reads its old p, so it runs after the
    barrier. Each band sums its own columns in float32; the decision adds them in double and uses
    that sum only through the rounding bound (else the exact serial float sum), so neither banding nor thread count can
    change a result."""
    nb = bands.shape[0] - 1
    libm = np.zeros(nb, np.int64)
    more = True
    for _ in range(n_iter):
        for b in prange(nb):
            colsums[b, :] = _ZERO
            libm[b] += sweep_rows(bands[b], bands[b + 1], I1wx, I1wy, rho_c, u1, u2, p11, p12, p21, p22,
                                  zrow, terms, colsums[b], scratches[b], l_t, theta, taut)
        for b in prange(nb):
            libm[b] += dual_row(bands[b + 1] - 1, u1, u2, p11, p12, p21, p22, scratches[b], taut)
        if not _decide(colsums, terms, eps, gamma, stats):
            more = False
            break
    stats[2] += libm.sum()
    return more
