"""The fused TV-L1 engine's warp (per warp of each scale; flowprep/tvl1_fused.py drives it).

What it computes: OpenCV's centeredGradient of I1 (per scale), then, per warp, OpenCV 5.0's
cubic remap of I1, I1x and I1y sharing one set of weights per pixel, fused with buildFlowMap and
calcGradRho's rho_c, in OpenCV's float32 operations in OpenCV's order (no fast-math flags, so
LLVM neither reassociates nor fuses; llvm.fma only where OpenCV's AVX2 remap has FMAs).

Why IR. Each pixel reads 48 source values at positions that depend on the flow: a gather. numba's
loop vectoriser will not emit gathers for the scalar kernel (it cannot bound the addresses to
rule out aliasing with the outputs), so the scalar warp ran at ~20 ns a pixel, a quarter of a
fast-preset solve. Here 16 pixels go at a time, read one of two ways (same values): when all 16
read one source row at one column offset (a translation, about a third of bikes' blocks), plain
vector loads; else llvm.masked.gather (vgatherdps on AVX2 and AVX-512; LLVM splits or scalarises
them elsewhere, with the same results), I1 and I1x as one 64-bit gather from their interleaved
copy. About 3x faster than the scalar warp.

How it plugs in. Rows go 16 pixels at a time through LLVM IR written here (`module_ir`), the rest
of a row through the scalar numba code below, the same arithmetic. `make_warp16` makes numba
intrinsics whose code generation adds the IR to the calling function's library (so numba's
on-disk cache keeps it, keyed on this file: the IR and its callers live in one file so that an
edit to either recompiles both). Lanes outside [-2, W+1) x [-2, H+1) (NaN included) gather
nothing and give 0, as the scalar code's branch does.
"""
from __future__ import annotations

import struct

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from flowprep.tvl1_kernels import _HALF, _ONE, _ZERO, F32, _fma, _jit

LANES = 16
_V = f"<{LANES} x float>"


def _f32(x: float) -> str:
    """An LLVM float constant: the float32 value written as a double in hex, as LLVM wants it."""
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", float(np.float32(x))))[0]


def _splat(x: float) -> str:
    return "<" + ", ".join([f"float {_f32(x)}"] * LANES) + ">"


def _function(name: str, use_fma: bool, pad: int) -> str:
    body: list[str] = []
    count = [0]

    def op(expr: str) -> str:
        count[0] += 1
        body.append(f"  %v{count[0]} = {expr}")
        return f"%v{count[0]}"

    def mul(a, b): return op(f"fmul {_V} {a}, {b}")
    def add(a, b): return op(f"fadd {_V} {a}, {b}")
    def sub(a, b): return op(f"fsub {_V} {a}, {b}")
    def fma(a, b, c): return op(f"call {_V} @llvm.fma.v16f32({_V} {a}, {_V} {b}, {_V} {c})")
    def select(m, a): return op(f"select <{LANES} x i1> {m}, {_V} {a}, {_V} zeroinitializer")

    A, K3, K2, ONE = _splat(-0.75), _splat(1.25), _splat(-2.25), _splat(1.0)

    def coeffs(t):   # _cubic_coeffs
        u, t2 = sub(ONE, t), mul(t, t)
        c0 = mul(A, mul(t, mul(u, u)))
        c3 = mul(A, mul(u, t2))
        c1 = fma(fma(K3, t, K2), t2, ONE) if use_fma else add(mul(add(mul(K3, t), K2), t2), ONE)
        return c0, c1, sub(sub(sub(ONE, c0), c1), c3), c3

    def dot4(p, c):   # _dot4
        if use_fma:
            return fma(p[3], c[3], fma(p[2], c[2], fma(p[1], c[1], mul(p[0], c[0]))))
        return add(add(add(mul(p[0], c[0]), mul(p[1], c[1])), mul(p[2], c[2])), mul(p[3], c[3]))

    def load(ptr: str, at: str = "%x0") -> str:
        return op(f"load {_V}, ptr {op(f'getelementptr float, ptr {ptr}, i64 {at}')}, align 4")

    iota = "<" + ", ".join(f"float {_f32(i)}" for i in range(LANES)) + ">"
    body.append("  %k = phi i64 [0, %entry], [%k1, %join]")
    body.append(f"  %x0 = mul i64 %k, {LANES}")
    body.append(f"  %x0v.0 = insertelement <{LANES} x i32> poison, i32 {op('trunc i64 %x0 to i32')}, i64 0")
    body.append(f"  %x0v = shufflevector <{LANES} x i32> %x0v.0, <{LANES} x i32> poison, <{LANES} x i32> zeroinitializer")
    xs = op(f"insertelement {_V} poison, float {op('sitofp i64 %x0 to float')}, i64 0")
    xf = add(op(f"shufflevector {_V} {xs}, {_V} poison, <{LANES} x i32> zeroinitializer"), iota)
    u1, u2, i0 = load("%u1"), load("%u2"), load("%i0")
    sx, sy = add(xf, u1), add("%fy0v", u2)   # buildFlowMap
    inside = [op(f"fcmp oge {_V} {sx}, {_splat(-2.0)}"), op(f"fcmp olt {_V} {sx}, %wlimv"),
              op(f"fcmp oge {_V} {sy}, {_splat(-2.0)}"), op(f"fcmp olt {_V} {sy}, %hlimv")]
    m = op(f"and <{LANES} x i1> {op(f'and <{LANES} x i1> {inside[0]}, {inside[1]}')}, "
           f"{op(f'and <{LANES} x i1> {inside[2]}, {inside[3]}')}")
    sx, sy = select(m, sx), select(m, sy)   # lanes outside: 0, a harmless index
    fx = op(f"call {_V} @llvm.floor.v16f32({_V} {sx})")
    fy = op(f"call {_V} @llvm.floor.v16f32({_V} {sy})")
    cx, cy = coeffs(sub(sx, fx)), coeffs(sub(sy, fy))
    ix = op(f"fptosi {_V} {fx} to <{LANES} x i32>")
    iy = op(f"fptosi {_V} {fy} to <{LANES} x i32>")
    idx = op(f"add <{LANES} x i32> {op(f'mul <{LANES} x i32> {iy}, %rsv')}, {ix}")
    # Uniform block: every lane inside, one source row, one column offset (ix = x + d): the taps
    # are plain vector loads. Else gathers, I1 and I1x as one 64-bit gather from their
    # interleaved copy (half the element loads), I1y as 32-bit ones.
    V32 = f"<{LANES} x i32>"
    d = op(f"sub {V32} {ix}, {op(f'add {V32} %x0v, {_iota32()}')}")
    dmin, dmax, rmin, rmax = (op(f"call i32 @llvm.vector.reduce.{f}.v16i32({V32} {v})")
                              for f, v in (("smin", d), ("smax", d), ("smin", iy), ("smax", iy)))
    allin = op(f"call i1 @llvm.vector.reduce.and.v16i1(<{LANES} x i1> {m})")
    one_d = op(f"icmp eq i32 {dmin}, {dmax}")
    one_r = op(f"icmp eq i32 {rmin}, {rmax}")
    uni = op(f"and i1 {op(f'and i1 {allin}, {one_d}')}, {one_r}")
    body.append(f"  br i1 {uni}, label %fast, label %slow")
    body.append("fast:")
    # S[ch][r0 - 1 + pad + i][x0 + d - 1 + pad + j + lane]: rows and offsets from the entry's taps
    r64 = op(f"sext i32 {rmin} to i64")
    d64 = op(f"sext i32 {dmin} to i64")
    base = op(f"add i64 {op(f'mul i64 {r64}, %rs64')}, {op(f'add i64 %x0, {d64}')}")
    fast = []
    for ch in range(3):
        rows = []
        for i in range(4):
            taps = [load(f"%tap{ch}{i}{j}", base) for j in range(4)]
            rows.append(dot4(taps, cx))
        fast.append(dot4(rows, cy))   # every lane inside: nothing to zero
    body.append("  br label %join")
    body.append("slow:")
    Q = f"<{LANES} x i64>"
    rows = [[], [], []]
    for i in range(4):
        taps = [[], [], []]
        for j in range(4):
            ptrs = op(f"getelementptr i64, ptr %pair{i}{j}, {V32} {idx}")
            g = op(f"call {Q} @llvm.masked.gather.v16i64.v16p0(<{LANES} x ptr> align 8 {ptrs}, "
                   f"<{LANES} x i1> {m}, {Q} zeroinitializer)")
            hi = op(f"lshr {Q} {g}, <" + ", ".join(["i64 32"] * LANES) + ">")
            taps[0].append(op(f"bitcast {V32} {op(f'trunc {Q} {g} to {V32}')} to {_V}"))    # I1: low half
            taps[1].append(op(f"bitcast {V32} {op(f'trunc {Q} {hi} to {V32}')} to {_V}"))   # I1x: high half
            ptrs = op(f"getelementptr float, ptr %tap2{i}{j}, {V32} {idx}")
            taps[2].append(op(f"call {_V} @llvm.masked.gather.v16f32.v16p0(<{LANES} x ptr> align 4 {ptrs}, "
                              f"<{LANES} x i1> {m}, {_V} zeroinitializer)"))
        for ch in range(3):
            rows[ch].append(dot4(taps[ch], cx))
    slow = [select(m, dot4(rows[ch], cy)) for ch in range(3)]
    body.append("  br label %join")
    body.append("join:")
    w, wx, wy = (op(f"phi {_V} [{a}, %fast], [{b}, %slow]") for a, b in zip(fast, slow))
    rho = sub(sub(sub(w, mul(wx, u1)), mul(wy, u2)), i0)
    for arr, v in (("ix", wx), ("iy", wy), ("rho", rho)):
        body.append(f"  store {_V} {v}, ptr {op(f'getelementptr float, ptr %o{arr}, i64 %x0')}, align 4")
    body += ["  %k1 = add i64 %k, 1", "  %done = icmp eq i64 %k1, %nblk",
             "  br i1 %done, label %exit, label %loop"]

    entry = []
    for name_, ty, src in (("fy0v", "float", "%fy0"), ("wlimv", "float", "%wlim"), ("hlimv", "float", "%hlim"),
                           ("rsv", "i32", "%rs")):
        vt = f"<{LANES} x {ty}>"
        entry += [f"  %{name_}.0 = insertelement {vt} poison, {ty} {src}, i64 0",
                  f"  %{name_} = shufflevector {vt} %{name_}.0, {vt} poison, <{LANES} x i32> zeroinitializer"]
    entry.append("  %rs64 = sext i32 %rs to i64")
    # tap (i, j) of a pixel with floor(s) = (fx, fy) reads S[ch][fy - 1 + pad + i][fx - 1 + pad + j]
    for i in range(4):
        entry.append(f"  %row{i} = mul i64 %rs64, {pad - 1 + i}")
        for j in range(4):
            entry.append(f"  %off{i}{j} = add i64 %row{i}, {pad - 1 + j}")
            for ch in range(3):
                entry.append(f"  %tap{ch}{i}{j} = getelementptr float, ptr %S{ch}, i64 %off{i}{j}")
            entry.append(f"  %pair{i}{j} = getelementptr i64, ptr %S01, i64 %off{i}{j}")
    entry += ["  %none = icmp eq i64 %nblk, 0", "  br i1 %none, label %exit, label %loop"]
    args = ", ".join(["ptr noalias %S0", "ptr noalias %S1", "ptr noalias %S2", "ptr noalias %S01", "i32 %rs",
                      "ptr noalias %u1",
                      "ptr noalias %u2", "ptr noalias %i0", "ptr noalias %oix", "ptr noalias %oiy",
                      "ptr noalias %orho", "i64 %nblk", "float %fy0", "float %wlim",
                      "float %hlim"])
    # weak_odr: kept although nothing in its own module calls it, and one copy when two libraries have it
    return (f"define weak_odr void @{name}({args}) {{\nentry:\n" + "\n".join(entry) + "\nloop:\n"
            + "\n".join(body) + "\nexit:\n  ret void\n}\n")


def _iota32() -> str:
    return "<" + ", ".join(f"i32 {i}" for i in range(LANES)) + ">"


def module_ir(pad: int) -> str:
    """The IR text of both variants for source planes with a `pad`-wide zero frame."""
    return (f"declare {_V} @llvm.fma.v16f32({_V}, {_V}, {_V})\n"
            f"declare {_V} @llvm.floor.v16f32({_V})\n"
            f"declare {_V} @llvm.masked.gather.v16f32.v16p0(<{LANES} x ptr>, <{LANES} x i1>, {_V})\n"
            f"declare <{LANES} x i64> @llvm.masked.gather.v16i64.v16p0(<{LANES} x ptr>, <{LANES} x i1>, <{LANES} x i64>)\n"
            f"declare i32 @llvm.vector.reduce.smin.v16i32(<{LANES} x i32>)\n"
            f"declare i32 @llvm.vector.reduce.smax.v16i32(<{LANES} x i32>)\n"
            f"declare i1 @llvm.vector.reduce.and.v16i1(<{LANES} x i1>)\n"
            + _function("tvl1_warp16_fma", True, pad) + _function("tvl1_warp16_plain", False, pad))


def make_warp16(pad: int) -> tuple:
    """Two numba intrinsics, (with FMAs, without), each warp(S0, S1, S2, pairs, u1, u2, I0, I1wx,
    I1wy, rho_c, nblk, y, W+1, H+1) warping the first 16*nblk pixels of a row: S0..S2 are the
    padded planes of I1, I1x, I1y (2-D, (H + 2 pad) x (W + 2 pad)), pairs the same I1 and I1x
    interleaved ((H + 2 pad) x (W + 2 pad) x 2: the IR uses S0's row length for both), the others
    that row's 1-D views; y, W+1 and H+1 are float32. Every array must be C-contiguous float32
    (typing refuses others). Gather indices are int32: fine while the padded plane has fewer
    than 2^31 pixels, which tvl1_fused.unsupported's 32767-a-side limit ensures."""
    text = module_ir(pad)

    def make(name: str):
        @intrinsic
        def warp16(typingctx, S0, S1, S2, S01, u1, u2, i0, oix, oiy, orho, nblk, fy0, wlim, hlim):
            arrays = (S0, S1, S2, S01, u1, u2, i0, oix, oiy, orho)
            if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"
                       for a in arrays):
                return None   # the IR reads raw float32 rows: nothing else may reach it
            sig = types.void(S0, S1, S2, S01, u1, u2, i0, oix, oiy, orho, nblk, fy0, wlim, hlim)

            def codegen(context, builder, sig, args):
                context.active_code_library.add_llvm_module(llvm.parse_assembly(text))
                fp = ir.PointerType(ir.FloatType())
                fnty = ir.FunctionType(ir.VoidType(), [fp] * 4 + [ir.IntType(32)] + [fp] * 6
                                       + [ir.IntType(64)] + [ir.FloatType()] * 3)
                fn = cgutils.get_or_insert_function(builder.module, fnty, name)
                arrays = [context.make_array(ty)(context, builder, v) for ty, v in zip(sig.args[:10], args[:10])]
                row_stride = builder.trunc(cgutils.unpack_tuple(builder, arrays[0].shape)[1], ir.IntType(32))
                ptrs = [builder.bitcast(a.data, fp) for a in arrays]
                builder.call(fn, ptrs[:4] + [row_stride] + ptrs[4:] + list(args[10:]))
                return context.get_dummy_value()
            return sig, codegen
        return warp16
    return make("tvl1_warp16_fma"), make("tvl1_warp16_plain")


_A = F32(-0.75)          # OpenCV's bicubic parameter
_K3 = F32(1.25)          # A + 2
_K2 = F32(-2.25)         # -(A + 3)
PAD = 3                  # zero frame around the warp sources: every tap of a pixel with any tap inside fits
_WARP16_FMA, _WARP16_PLAIN = make_warp16(PAD)


# ---------------------------------------------------------------------------------------------
# Per scale: OpenCV's centeredGradient of I1, written with I1 into zero-framed planes.


@njit(**_jit)
def centered_gradient_padded(src, dst, pairs):
    """dst[0] = I1, dst[1] = dI1/dx, dst[2] = dI1/dy, each inside a PAD-wide zero frame, and
    pairs[..., 0], pairs[..., 1] = dst[0], dst[1] interleaved (the warp gathers them as one
    64-bit value). 0.5f*(a - b) of the neighbours, one-sided at the borders, as OpenCV."""
    H, W = src.shape
    dst[:] = _ZERO
    pairs[:] = _ZERO
    for y in range(H):
        ym = y - 1 if y > 0 else 0
        yp = y + 1 if y < H - 1 else H - 1
        for x in range(W):
            xm = x - 1 if x > 0 else 0
            xp = x + 1 if x < W - 1 else W - 1
            i = src[y, x]
            gx = _HALF * (src[y, xp] - src[y, xm])
            dst[0, y + PAD, x + PAD] = i
            dst[1, y + PAD, x + PAD] = gx
            dst[2, y + PAD, x + PAD] = _HALF * (src[yp, x] - src[ym, x])
            pairs[y + PAD, x + PAD, 0] = i
            pairs[y + PAD, x + PAD, 1] = gx


# ---------------------------------------------------------------------------------------------
# Per warp: bicubic warp of I1, I1x and I1y with one set of weights per pixel, fused with
# OpenCV's buildFlowMap and calcGradRho's rho_c (its grad is recomputed where used). OpenCV
# 5.0's remap(INTER_CUBIC) with float maps does not use the 1/32 fixed-point weight table of
# earlier versions: it takes the fraction in float and computes the weights per pixel; its AVX2 build (what OpenCV dispatches to on a CPU with AVX2)
# fuses them with FMAs, its baseline build does not. Taps outside the image read the constant
# border 0. Order and FMAs below were read off its results bit for bit (tests/test_tvl1_fused.py
# checks both variants against cv2.remap).


@njit(inline="always", **_jit)
def _cubic_coeffs(t, use_fma):
    """remap's cubic weights for the fraction t (A = -0.75), in its operation order."""
    u = _ONE - t
    t2 = t * t
    c0 = _A * (t * (u * u))
    c3 = _A * (u * t2)
    if use_fma:
        c1 = _fma(_fma(_K3, t, _K2), t2, _ONE)
    else:
        c1 = (_K3 * t + _K2) * t2 + _ONE
    c2 = ((_ONE - c0) - c1) - c3
    return c0, c1, c2, c3


@njit(inline="always", **_jit)
def _dot4(p0, p1, p2, p3, c0, c1, c2, c3, use_fma):
    if use_fma:
        return _fma(p3, c3, _fma(p2, c2, _fma(p1, c1, p0 * c0)))
    return ((p0 * c0 + p1 * c1) + p2 * c2) + p3 * c3


@njit(inline="always", **_jit)
def _tap_rows(S, ch, r, c, cx0, cx1, cx2, cx3, cy0, cy1, cy2, cy3, use_fma):
    a0 = _dot4(S[ch, r, c], S[ch, r, c + 1], S[ch, r, c + 2], S[ch, r, c + 3], cx0, cx1, cx2, cx3, use_fma)
    a1 = _dot4(S[ch, r + 1, c], S[ch, r + 1, c + 1], S[ch, r + 1, c + 2], S[ch, r + 1, c + 3],
               cx0, cx1, cx2, cx3, use_fma)
    a2 = _dot4(S[ch, r + 2, c], S[ch, r + 2, c + 1], S[ch, r + 2, c + 2], S[ch, r + 2, c + 3],
               cx0, cx1, cx2, cx3, use_fma)
    a3 = _dot4(S[ch, r + 3, c], S[ch, r + 3, c + 1], S[ch, r + 3, c + 2], S[ch, r + 3, c + 3],
               cx0, cx1, cx2, cx3, use_fma)
    return _dot4(a0, a1, a2, a3, cy0, cy1, cy2, cy3, use_fma)


@njit(inline="always", **_jit)
def _warp_row(y, I0, S, pairs, u1, u2, I1wx, I1wy, rho_c, use_fma):
    """The warp of row y: blocks of 16 pixels in the IR above, the rest here (the
    same arithmetic; tests/test_tvl1_fused.py checks a width with both against the remap model)."""
    H, W = I0.shape
    fy0 = F32(y)
    nblk = W // LANES
    if nblk > 0:
        wl = F32(W + 1)
        hl = F32(H + 1)
        if use_fma:
            _WARP16_FMA(S[0], S[1], S[2], pairs, u1[y], u2[y], I0[y], I1wx[y], I1wy[y], rho_c[y], nblk, fy0, wl, hl)
        else:
            _WARP16_PLAIN(S[0], S[1], S[2], pairs, u1[y], u2[y], I0[y], I1wx[y], I1wy[y], rho_c[y], nblk, fy0, wl, hl)
    for x in range(nblk * LANES, W):
        u1v = u1[y, x]
        u2v = u2[y, x]
        sx = F32(x) + u1v   # buildFlowMap: x + u1, y + u2 in float
        sy = fy0 + u2v
        w = _ZERO
        wx = _ZERO
        wy = _ZERO
        # A tap inside needs floor(sx) in [-2, W] and floor(sy) in [-2, H]; else every tap reads
        # the zero border (NaN lands here too).
        if sx >= F32(-2.0) and sx < F32(W + 1) and sy >= F32(-2.0) and sy < F32(H + 1):
            fx = np.floor(sx)
            fy = np.floor(sy)
            cx0, cx1, cx2, cx3 = _cubic_coeffs(sx - fx, use_fma)
            cy0, cy1, cy2, cy3 = _cubic_coeffs(sy - fy, use_fma)
            r = int(fy) - 1 + PAD
            c = int(fx) - 1 + PAD
            w = _tap_rows(S, 0, r, c, cx0, cx1, cx2, cx3, cy0, cy1, cy2, cy3, use_fma)
            wx = _tap_rows(S, 1, r, c, cx0, cx1, cx2, cx3, cy0, cy1, cy2, cy3, use_fma)
            wy = _tap_rows(S, 2, r, c, cx0, cx1, cx2, cx3, cy0, cy1, cy2, cy3, use_fma)
        I1wx[y, x] = wx
        I1wy[y, x] = wy
        rho_c[y, x] = ((w - wx * u1v) - wy * u2v) - I0[y, x]


@njit(**_jit)
def warp_rows(y0, y1, I0, S, pairs, u1, u2, I1wx, I1wy, rho_c, use_fma):
    """The warp of rows y0 .. y1-1 (the whole image for one thread)."""
    for y in range(y0, y1):
        _warp_row(y, I0, S, pairs, u1, u2, I1wx, I1wy, rho_c, use_fma)


@njit(parallel=True, **_jit)
def warp_parallel(bands, I0, S, pairs, u1, u2, I1wx, I1wy, rho_c, use_fma):
    for b in prange(bands.shape[0] - 1):
        warp_rows(bands[b], bands[b + 1], I0, S, pairs, u1, u2, I1wx, I1wy, rho_c, use_fma)
