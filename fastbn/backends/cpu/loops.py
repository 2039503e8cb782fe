"""The CPU kernels' building blocks: half types in registers, optional operands, and the inner loops.

Every inner loop runs over a 1-D contiguous view with an index from
``range(len)``: Numba then knows the index is non-negative and drops its
negative-index check, which otherwise blocks vectorisation (2.5x slower).
"run" helpers work on one channel's contiguous run with scalar statistics
(SLAB); "cols" helpers work across a row's channels with per-channel arrays
(ROWS).  How each is compiled, and why, is in :mod:`fastbn.backends.cpu.jit`.

float16 arrays arrive viewed as ``uint16`` (Numba's CPU target has no
float16 type) and are converted in registers with the hardware's
half<->single instructions; bfloat16 arrays arrive viewed as ``int16`` (a
distinct type, so that :func:`load` and :func:`cast_to` specialise on it)
and are converted with integer arithmetic on the bits.  Elementwise work is
done in the statistics dtype (float32 for float16, bfloat16 and float32
input, float64 for float64 input).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from fastbn.backends.cpu.jit import elementwise, inline, reduction
from fastbn.backends.cpu.nontemporal import stream_copy
from fastbn.backends.cpu.plan import BLOCK_ELEMENTS


# ---------------------------------------------------------------- float16 ---
@intrinsic
def _half_bits_to_float(typingctx, bits):
    """Reinterpret 16 bits as IEEE half and widen to float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _float_to_half_bits(typingctx, value):
    """Round float32 to IEEE half (to nearest even, as NumPy) and return its bits."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# --------------------------------------------------------------- bfloat16 ---
# bfloat16 is the upper half of a float32 (sign, the same 8-bit exponent, 7
# of its 23 fraction bits), so widening is exact: the 16 bits shifted into
# the top of a 32-bit word.  Narrowing rounds to nearest, ties to even, on
# the float32's bits b: adding 0x7FFF + (bit 16 of b) and dropping the low
# 16 bits rounds up exactly when the dropped half is above 0x8000, or equal
# to it (a tie) with an odd kept bit.  A carry out of the fraction steps the
# exponent, which is the right answer: the next binade, or Inf from
# 0x7F7F8000 up (half an ulp past bfloat16's largest finite value, 0x7F7F).
# Inf, whose fraction is 0, stays Inf; zeros and subnormals round like any
# other bits (no flush); b + 0x8000 never passes 2^32 for a non-NaN b (at
# most 0xFF800000, -Inf).  A NaN whose payload lies in the low 16 bits would
# round to Inf, so every NaN becomes the quiet NaN 0x7FC0 with its sign
# kept: ml_dtypes' (Eigen's) conversion, bit for bit.  (torch's scalar
# conversion gives 0x7FC0 for every NaN, its vectorised one 0xFFFF: NaN bits
# are not portable.)  The NaN case is a select, not a branch, so loops of it
# vectorise.  An output's error is then the float32 arithmetic's plus this
# one rounding, at most 2^-8 of its magnitude (half an ulp of an 8-bit
# significand; tests/strategies.py derives the tolerance).
@intrinsic
def _bfloat16_bits_to_float(typingctx, bits):
    """Widen the bfloat16 whose bits are ``bits`` to float32 (exact)."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        word = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return sig, codegen


@intrinsic
def _float_to_bfloat16_bits(typingctx, value):
    """Round float32 to bfloat16 (to nearest even, NaN kept a quiet NaN) and return its bits."""
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        high = builder.lshr(bits, ir.Constant(i32, 16))
        bias = builder.add(builder.and_(high, ir.Constant(i32, 1)), ir.Constant(i32, 0x7FFF))
        rounded = builder.lshr(builder.add(bits, bias), ir.Constant(i32, 16))
        quiet_nan = builder.or_(builder.and_(high, ir.Constant(i32, 0x8000)), ir.Constant(i32, 0x7FC0))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return sig, codegen


# ------------------------------------------------------ loads and stores ---
def load(value):
    """Read one element as a number: float16 (uint16) and bfloat16 (int16) bits become float32."""


@overload(load, inline="always")
def _load_impl(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float(value)
    if value == types.int16:
        return lambda value: _bfloat16_bits_to_float(value)
    return lambda value: value


def cast_to(array, value):
    """Convert ``value`` to the element type stored in ``array`` (or to the type of the number ``array``)."""


@overload(cast_to, inline="always")
def _cast_to_impl(array, value):
    kind = array.dtype if isinstance(array, types.Array) else array  # an array, or a number of that type
    if kind == types.uint16:
        return lambda array, value: _float_to_half_bits(np.float32(value))
    if kind == types.int16:
        return lambda array, value: _float_to_bfloat16_bits(np.float32(value))
    if kind == types.float32:
        return lambda array, value: np.float32(value)
    return lambda array, value: np.float64(value)


# ------------------------------------------------------ optional operands ---
# The fused variants (activation, residual, the ReLU mask in backward, the
# residual's gradient) pass an array or None.  These helpers are resolved when
# Numba types a kernel: with None they compile to nothing, so the plain batch
# norm pays no branch, and each combination is its own specialisation.


def part(array, index):
    """``array[index]``, or None when ``array`` is None (a run or row of an optional operand)."""


@overload(part, inline="always")
def _part_impl(array, index):
    if isinstance(array, types.NoneType):
        return lambda array, index: None
    return lambda array, index: array[index]


def plus(value, addend, i):
    """``value + addend[i]`` (the residual), or ``value`` when ``addend`` is None."""


@overload(plus, inline="always")
def _plus_impl(value, addend, i):
    if isinstance(addend, types.NoneType):
        return lambda value, addend, i: value
    return lambda value, addend, i: value + load(addend[i])


def gradient(dy, mask, i):
    """``dy[i]`` where ``mask[i] > 0`` (the ReLU's output), else 0; ``dy[i]`` when ``mask`` is None.

    NaN in the output passes no gradient, as in PyTorch's ``threshold_backward``.
    """


@overload(gradient, inline="always")
def _gradient_impl(dy, mask, i):
    if isinstance(mask, types.NoneType):
        return lambda dy, mask, i: load(dy[i])
    zero = np.float64(0) if dy.dtype == types.float64 else np.float32(0)  # float32 for the half types and float32

    def impl(dy, mask, i):
        return _select(load(mask[i]) > 0, load(dy[i]), zero)

    return impl


def store(array, i, value):
    """``array[i] = value`` (converted to its element type); nothing when ``array`` is None."""


@overload(store, inline="always")
def _store_impl(array, i, value):
    if isinstance(array, types.NoneType):
        return lambda array, i, value: None

    def impl(array, i, value):
        array[i] = cast_to(array, value)

    return impl


def flat(array):
    """``array.reshape(-1)`` of a C-contiguous array, or None when ``array`` is None."""


@overload(flat, inline="always")
def _flat_impl(array):
    if isinstance(array, types.NoneType):
        return lambda array: None
    return lambda array: array.reshape(-1)


def scratch_for(nt, array, size):
    """An uninitialised buffer of ``size`` elements of ``array``'s dtype, or None when ``nt`` or ``array`` is None."""


@overload(scratch_for, inline="always")
def _scratch_for_impl(nt, array, size):
    if isinstance(nt, types.NoneType) or isinstance(array, types.NoneType):
        return lambda nt, array, size: None
    return lambda nt, array, size: np.empty(size, array.dtype)


def stream_out(dst, src):
    """:func:`fastbn.backends.cpu.nontemporal.stream_copy`, or nothing when ``dst`` is None."""


@overload(stream_out, inline="always")
def _stream_out_impl(dst, src):
    if isinstance(dst, types.NoneType):
        return lambda dst, src: None
    return lambda dst, src: stream_copy(dst, src)


@elementwise
def _select(condition, if_true, if_false):
    """``if_true if condition else if_false``, compiled to a select (no branch in vector loops).

    Left to LLVM to inline: inlining a function with a branch at the Numba IR
    level trips Numba's SSA checks (NumbaIRAssumptionWarning).
    """
    if condition:
        return if_true
    return if_false


@inline
def centred_times_k(centred, k):
    """``(x - mean) * k`` of dx, 0 where k is 0 (eval, or no spread): dx = g * scale is then finite
    wherever g is, though x or the mean is NaN or Inf (as PyTorch's eval backward, which never reads x)."""
    return _select(k == 0, k, centred * k)


@inline
def clamp_below(value, floor):
    """``max(value, floor)`` that keeps NaN (the ReLU with floor 0; identity with floor -inf)."""
    return floor if value < floor else value


@inline
def row_block(M, C):
    """Rows per block and number of blocks for an (M, C) ROWS view."""
    rows = max(1, BLOCK_ELEMENTS // C)
    return rows, (M + rows - 1) // rows


# ------------------------------------------------------------ inner loops ---
# Per-run reductions are compiled once per signature (jit.reduction), the
# elementwise helpers without reassociation (jit.elementwise), the per-row
# ROWS accumulations inlined into their kernels.


@reduction
def run_sum_widen(v, wide, pivot):
    # Sum of x - pivot in float64, keeping each shifted element for the second pass.
    total = 0.0
    for i in range(v.shape[0]):
        value = np.float64(load(v[i])) - pivot
        wide[i] = value
        total += value
    return total


@reduction
def run_sum_sq_dev(v, mean):
    # Squared deviations from the float64 mean (second of two passes).
    total = 0.0
    for i in range(v.shape[0]):
        d = load(v[i]) - mean
        total += d * d
    return total


@elementwise
def run_affine(v, z, out, mean, scale, shift, floor):
    # y = act((x - mean) * scale + shift + z): z (residual) optional, act = max(., floor).
    for i in range(v.shape[0]):
        out[i] = cast_to(out, clamp_below(plus((load(v[i]) - mean) * scale + shift, z, i), floor))


@reduction
def run_grad_sums(g, m, v, mean):
    # m: the ReLU's output (the gradient passes where it is > 0), or None.
    sum_dy = 0.0
    dotp = 0.0
    for i in range(v.shape[0]):
        gi = gradient(g, m, i)
        sum_dy += gi
        dotp += (np.float64(load(v[i])) - mean) * gi
    return sum_dy, dotp


@elementwise
def run_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    # dres: the residual's gradient (the masked dy), written in the same pass, or None.
    for i in range(v.shape[0]):
        gi = gradient(g, m, i)
        centred = load(v[i]) - mean
        out[i] = cast_to(out, (gi - mean_dy - centred_times_k(centred, k)) * scale)
        store(dres, i, gi)


# The ROWS statistics accumulate x - pivot, one pivot per channel (see
# fastbn.backends.cpu.reductions.channel_pivot); ``mean`` there is the block's
# mean of x - pivot.


@inline
def cols_sum(v, pivot, total):
    for j in range(v.shape[0]):
        total[j] += np.float64(load(v[j])) - pivot[j]


@inline
def cols_sum_sq_dev(v, pivot, mean, m2):
    for j in range(v.shape[0]):
        d = (np.float64(load(v[j])) - pivot[j]) - mean[j]
        m2[j] += d * d


# Two rows at a time: one load and store of each float64 accumulator per
# two elements instead of one (the accumulators live in L1, and loading and
# storing them bounds the one-row loops; measured 20% faster).


@inline
def cols_sum2(a, b, pivot, total):
    for j in range(a.shape[0]):
        total[j] += (np.float64(load(a[j])) - pivot[j]) + (np.float64(load(b[j])) - pivot[j])


@inline
def cols_sum_sq_dev2(a, b, pivot, mean, m2):
    for j in range(a.shape[0]):
        da = (np.float64(load(a[j])) - pivot[j]) - mean[j]
        db = (np.float64(load(b[j])) - pivot[j]) - mean[j]
        m2[j] += da * da + db * db


@inline
def cols_grad_sums2(ga, ma, a, gb, mb, b, mean, sum_dy, dotp):
    for j in range(a.shape[0]):
        g0 = np.float64(gradient(ga, ma, j))
        g1 = np.float64(gradient(gb, mb, j))
        sum_dy[j] += g0 + g1
        dotp[j] += (np.float64(load(a[j])) - mean[j]) * g0 + (np.float64(load(b[j])) - mean[j]) * g1


@elementwise
def cols_affine(v, z, out, mean, scale, shift, floor):
    for j in range(v.shape[0]):
        out[j] = cast_to(out, clamp_below(plus((load(v[j]) - mean[j]) * scale[j] + shift[j], z, j), floor))


@inline
def cols_grad_sums(g, m, v, mean, sum_dy, dotp):
    for j in range(v.shape[0]):
        gj = gradient(g, m, j)
        sum_dy[j] += gj
        dotp[j] += (np.float64(load(v[j])) - mean[j]) * gj


@elementwise
def cols_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    for j in range(v.shape[0]):
        gj = gradient(g, m, j)
        centred = load(v[j]) - mean[j]
        out[j] = cast_to(out, (gj - mean_dy[j] - centred_times_k(centred, k[j])) * scale[j])
        store(dres, j, gj)
