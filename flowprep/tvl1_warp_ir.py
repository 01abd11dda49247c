"""The fused TV-L1 warp, 16 pixels at a time, as LLVM IR (flowprep/tvl1_kernels.py calls it).

What it computes: for 16 consecutive pixels of a row, exactly the scalar warp in tvl1_kernels
(`_warp_row`): OpenCV 5.0's cubic remap of I1, I1x and I1y sharing one set of weights per pixel,
then calcGradRho's rho_c, in the same float32 operations in the same order (no fast-math flags, so LLVM
neither reassociates nor fuses; llvm.fma only where OpenCV's AVX2 remap has FMAs).

Why IR. Each pixel reads 48 source values at positions that depend on the flow: a gather. numba's
loop vectoriser will not emit gathers for the scalar kernel (it cannot bound the addresses to
rule out aliasing with the outputs), so the scalar warp ran at ~20 ns a pixel, a quarter of a
fast-preset solve. Here the 48 reads are llvm.masked.gather of 16 lanes (vgatherdps on AVX2 and
AVX-512; LLVM splits or scalarises them elsewhere, with the same results), ~2.5x faster.

How it plugs in. `warp16(use_fma)` is a numba intrinsic: its code generation adds this module's
IR to the calling function's library (so numba's on-disk cache keeps it) and calls one of the
two functions, @tvl1_warp16_fma or @tvl1_warp16_plain. Lanes outside [-2, W+1) x [-2, H+1) (NaN
included) gather nothing and give 0, as the scalar kernel's branch does.
"""
from __future__ import annotations

import struct

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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

    def coeffs(t):   # tvl1_kernels._cubic_coeffs
        u, t2 = sub(ONE, t), mul(t, t)
        c0 = mul(A, mul(t, mul(u, u)))
        c3 = mul(A, mul(u, t2))
        c1 = fma(fma(K3, t, K2), t2, ONE) if use_fma else add(mul(add(mul(K3, t), K2), t2), ONE)
        return c0, c1, sub(sub(sub(ONE, c0), c1), c3), c3

    def dot4(p, c):   # tvl1_kernels._dot4
        if use_fma:
            return fma(p[3], c[3], fma(p[2], c[2], fma(p[1], c[1], mul(p[0], c[0]))))
        return add(add(add(mul(p[0], c[0]), mul(p[1], c[1])), mul(p[2], c[2])), mul(p[3], c[3]))

    def load(ptr: str) -> str:
        return op(f"load {_V}, ptr {op(f'getelementptr float, ptr {ptr}, i64 %x0')}, align 4")

    iota = "<" + ", ".join(f"float {_f32(i)}" for i in range(LANES)) + ">"
    body.append("  %k = phi i64 [0, %entry], [%k1, %loop]")
    body.append(f"  %x0 = mul i64 %k, {LANES}")
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
    warped = []
    for ch in range(3):
        rows = []
        for i in range(4):
            taps = []
            for j in range(4):
                ptrs = op(f"getelementptr float, ptr %tap{ch}{i}{j}, <{LANES} x i32> {idx}")
                taps.append(op(f"call {_V} @llvm.masked.gather.v16f32.v16p0(<{LANES} x ptr> align 4 {ptrs}, "
                               f"<{LANES} x i1> {m}, {_V} zeroinitializer)"))
            rows.append(dot4(taps, cx))
        warped.append(select(m, dot4(rows, cy)))
    w, wx, wy = warped
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
    for ch in range(3):
        for i in range(4):
            entry.append(f"  %row{ch}{i} = mul i64 %rs64, {pad - 1 + i}")
            for j in range(4):
                entry.append(f"  %off{ch}{i}{j} = add i64 %row{ch}{i}, {pad - 1 + j}")
                entry.append(f"  %tap{ch}{i}{j} = getelementptr float, ptr %S{ch}, i64 %off{ch}{i}{j}")
    entry += ["  %none = icmp eq i64 %nblk, 0", "  br i1 %none, label %exit, label %loop"]
    args = ", ".join(["ptr noalias %S0", "ptr noalias %S1", "ptr noalias %S2", "i32 %rs", "ptr noalias %u1",
                      "ptr noalias %u2", "ptr noalias %i0", "ptr noalias %oix", "ptr noalias %oiy",
                      "ptr noalias %orho", "i64 %nblk", "float %fy0", "float %wlim",
                      "float %hlim"])
    # weak_odr: kept although nothing in its own module calls it, and one copy when two libraries have it
    return (f"define weak_odr void @{name}({args}) {{\nentry:\n" + "\n".join(entry) + "\nloop:\n"
            + "\n".join(body) + "\nexit:\n  ret void\n}\n")


def module_ir(pad: int) -> str:
    """The IR text of both variants for source planes with a `pad`-wide zero frame."""
    return (f"declare {_V} @llvm.fma.v16f32({_V}, {_V}, {_V})\n"
            f"declare {_V} @llvm.floor.v16f32({_V})\n"
            f"declare {_V} @llvm.masked.gather.v16f32.v16p0(<{LANES} x ptr>, <{LANES} x i1>, {_V})\n"
            + _function("tvl1_warp16_fma", True, pad) + _function("tvl1_warp16_plain", False, pad))


def make_warp16(pad: int) -> tuple:
    """Two numba intrinsics, (with FMAs, without), each warp(S0, S1, S2, u1, u2, I0, I1wx, I1wy,
    rho_c, nblk, y, W+1, H+1) warping the first 16*nblk pixels of a row: S0..S2 are the
    padded planes of I1, I1x, I1y (2-D), the others that row's 1-D views; y, W+1 and H+1 are
    float32."""
    text = module_ir(pad)

    def make(name: str):
        @intrinsic
        def warp16(typingctx, S0, S1, S2, u1, u2, i0, oix, oiy, orho, nblk, fy0, wlim, hlim):
            sig = types.void(S0, S1, S2, u1, u2, i0, oix, oiy, orho, nblk, fy0, wlim, hlim)

            def codegen(context, builder, sig, args):
                context.active_code_library.add_llvm_module(llvm.parse_assembly(text))
                fp = ir.PointerType(ir.FloatType())
                fnty = ir.FunctionType(ir.VoidType(), [fp] * 3 + [ir.IntType(32)] + [fp] * 6
                                       + [ir.IntType(64)] + [ir.FloatType()] * 3)
                fn = cgutils.get_or_insert_function(builder.module, fnty, name)
                arrays = [context.make_array(ty)(context, builder, v) for ty, v in zip(sig.args[:9], args[:9])]
                row_stride = builder.trunc(cgutils.unpack_tuple(builder, arrays[0].shape)[1], ir.IntType(32))
                ptrs = [builder.bitcast(a.data, fp) for a in arrays]
                builder.call(fn, ptrs[:3] + [row_stride] + ptrs[3:] + list(args[9:]))
                return context.get_dummy_value()
            return sig, codegen
        return warp16
    return make("tvl1_warp16_fma"), make("tvl1_warp16_plain")
