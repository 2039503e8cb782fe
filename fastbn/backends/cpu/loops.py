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
from fastbn.backends.cpu.plan import BLOCK_ELEMENTS, LANE_BLOCK, MIN_STATS_ROWS


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


def halving(value):
    """``(h, 1 / h)`` of the type of ``value`` (a channel's mean): ``(0.5, 2)`` when ``|value|`` is at least half
    an ulp of the type's largest number (2^103 for float32, 2^970 for float64), else ``(1, 1)``.

    The elementwise formulas compute ``x - mean`` as ``x * h - mean * h`` and scale the product back by
    ``1 / h``.  ``x - mean`` can overflow, for finite x, only if ``|mean|`` reaches that bound (|x| is at most
    the largest number, and a smaller excess rounds down to it): x of +-3e38 has a float32 mean of 1.8e38 and
    a difference of 4.8e38, where the normalised output is -2.  Halving is exact (but for subnormal x, whose
    lost bit is far below the halved channel's other terms), so the result is bit for bit the unhalved
    formula's wherever that one does not overflow; with h = 1 the formula is the plain one, bit for bit.
    Compiled as selects: no branch in the vector loops.
    """


@overload(halving, inline="always")
def _halving_impl(value):
    if value == types.float32:
        bound, half, one, two = np.float32(2.0**103), np.float32(0.5), np.float32(1.0), np.float32(2.0)
    else:
        bound, half, one, two = np.float64(2.0**970), np.float64(0.5), np.float64(1.0), np.float64(2.0)

    def impl(value):
        huge = abs(value) >= bound
        return _select(huge, half, one), _select(huge, two, one)

    return impl


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


@elementwise
def affine_value(x, mean, scale):
    """``(x - mean) * scale`` of one element, through :func:`halving` so that ``x - mean`` cannot overflow."""
    h, back = halving(mean)
    return ((x * h - mean * h) * scale) * back


@elementwise
def dx_value(g, x, mean, mean_dy, k, scale):
    """``(g - mean_dy - (x - mean) * k) * scale`` of one element, halved as :func:`affine_value` where the mean
    or the mean gradient is that large (``g - mean_dy`` overflows as ``x - mean`` does)."""
    h, back = halving(max(abs(mean), abs(mean_dy)))
    return ((g * h - mean_dy * h - centred_times_k(x * h - mean * h, k)) * scale) * back


@inline
def clamp_below(value, floor):
    """``max(value, floor)`` that keeps NaN (the ReLU with floor 0; identity with floor -inf)."""
    return floor if value < floor else value


@inline
def row_block(M, C):
    """Rows per block and number of blocks for an (M, C) ROWS view."""
    rows = max(1, BLOCK_ELEMENTS // C)
    return rows, (M + rows - 1) // rows


@inline
def stats_row_block(M, C, x):
    """:func:`row_block` of the reductions (statistics, gradient sums): at least MIN_STATS_ROWS rows, at most
    LANE_BLOCK for the half types.

    Each block pays a few passes over its C channels (pivots, centres, a merge, a chunk's partial sums)
    besides its rows: with too few rows (2 of 8192 channels) those passes cost more than the rows themselves.
    """
    rows = max(MIN_STATS_ROWS, BLOCK_ELEMENTS // C)
    if narrow(x):
        rows = min(rows, LANE_BLOCK)
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


# float16 and bfloat16 runs (see "error bound" in fastbn.backends.cpu.reductions):
# the shifted values are rounded to float32 and summed in float32 (vector
# lanes twice as wide as float64's, and no widening) over blocks of at most
# LANE_BLOCK elements; the blocks' sums are added in float64.


@reduction
def run_sum_narrow(v, wide, pivot):
    # Sum of x - pivot (float32 pivot) in float32 blocks, keeping each shifted element for the second pass.
    total = 0.0
    for b0 in range(0, v.shape[0], LANE_BLOCK):
        vb = v[b0 : b0 + LANE_BLOCK]
        wb = wide[b0 : b0 + LANE_BLOCK]
        block = np.float32(0)
        for i in range(vb.shape[0]):
            value = load(vb[i]) - pivot
            wb[i] = value
            block += value
        total += np.float64(block)
    return total


@reduction
def run_dev_sums_narrow(wide, mean):
    # Sums of (d - mean)^2 and of d - mean, float32 within blocks: the corrected two-pass
    # algorithm's second pass (the second sum corrects the rounded float32 mean).
    sq = 0.0
    dev = 0.0
    for b0 in range(0, wide.shape[0], LANE_BLOCK):
        wb = wide[b0 : b0 + LANE_BLOCK]
        block_sq = np.float32(0)
        block_dev = np.float32(0)
        for i in range(wb.shape[0]):
            d = wb[i] - mean
            block_sq += d * d
            block_dev += d
        sq += np.float64(block_sq)
        dev += np.float64(block_dev)
    return sq, dev


def narrow(array):
    """True when ``array`` holds float16 (``uint16``) or bfloat16 (``int16``) bits: its statistics use float32 lanes."""


@overload(narrow, inline="always")
def _narrow_impl(array):
    flag = array.dtype in (types.uint16, types.int16)
    return lambda array: flag


def single(array):
    """True when ``array`` holds float32: its statistics use float32 lanes (:mod:`fastbn.backends.cpu.lanes`)."""


@overload(single, inline="always")
def _single_impl(array):
    flag = array.dtype == types.float32
    return lambda array: flag


def stats_scratch(x, size):
    """A buffer for ``size`` shifted elements of ``x``: float32 for float16 and bfloat16, else float64."""


@overload(stats_scratch, inline="always")
def _stats_scratch_impl(x, size):
    if x.dtype in (types.uint16, types.int16):
        return lambda x, size: np.empty(size, np.float32)
    return lambda x, size: np.empty(size, np.float64)


def run_shifted_sum(v, wide, pivot):
    """Sum of one run's ``x - pivot`` (float64 ``pivot``), keeping the shifted values in ``wide``.

    float64 sums for float32 and float64 runs, :func:`run_sum_narrow` for the half types.
    """


@overload(run_shifted_sum, inline="always")
def _run_shifted_sum_impl(v, wide, pivot):
    if wide.dtype == types.float32:
        return lambda v, wide, pivot: run_sum_narrow(v, wide, np.float32(pivot))
    return lambda v, wide, pivot: run_sum_widen(v, wide, pivot)


def shifted_moments(wide, total):
    """Mean and M2 of the shifted values in ``wide`` whose sum is ``total`` (second pass).

    float64: the plain second pass.  float32 (half types): the corrected
    two-pass algorithm around the float32 mean m32, mean = m32 + c / n and
    M2 = Q - c^2 / n with Q = sum((d - m32)^2), c = sum(d - m32), so that
    rounding the mean to float32 costs nothing at first order.
    """


@overload(shifted_moments, inline="always")
def _shifted_moments_impl(wide, total):
    if wide.dtype == types.float32:

        def impl(wide, total):
            size = wide.shape[0]
            m32 = np.float32(total / size)
            sq, dev = run_dev_sums_narrow(wide, m32)
            m2 = sq - dev * dev / size
            # >= c^2 / n exactly; rounding may undercut it by a few ulps (NaN stays NaN)
            return np.float64(m32) + dev / size, 0.0 if m2 < 0.0 else m2

        return impl

    def impl64(wide, total):
        mean = total / wide.shape[0]
        return mean, run_sum_sq_dev(wide, mean)

    return impl64


@elementwise
def run_affine(v, z, out, mean, scale, shift, floor):
    # y = act((x - mean) * scale + shift + z): z (residual) optional, act = max(., floor).
    h, back = halving(mean)
    mean_h = mean * h
    for i in range(v.shape[0]):
        out[i] = cast_to(out, clamp_below(plus(((load(v[i]) * h - mean_h) * scale) * back + shift, z, i), floor))


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


@reduction
def run_grad_sums_narrow(g, m, v, mean):
    # run_grad_sums of a float16 or bfloat16 run: float32 sums over blocks of LANE_BLOCK
    # elements, added in float64, around the float32 mean m32; sum((x - mean) g) is then
    # sum((x - m32) g) + (m32 - mean) sum(g), exact in the mean's rounding.
    m32 = np.float32(mean)
    sum_dy = 0.0
    dotp = 0.0
    for b0 in range(0, v.shape[0], LANE_BLOCK):
        gb = g[b0 : b0 + LANE_BLOCK]
        mb = part(m, slice(b0, b0 + LANE_BLOCK))
        vb = v[b0 : b0 + LANE_BLOCK]
        block_dy = np.float32(0)
        block_dotp = np.float32(0)
        for i in range(vb.shape[0]):
            gi = gradient(gb, mb, i)
            block_dy += gi
            block_dotp += (load(vb[i]) - m32) * gi
        sum_dy += np.float64(block_dy)
        dotp += np.float64(block_dotp)
    shift = np.float64(m32) - mean
    return sum_dy, dotp if shift == 0.0 else dotp + shift * sum_dy  # (0 * inf would be NaN)


@elementwise
def run_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    # dres: the residual's gradient (the masked dy), written in the same pass, or None.
    for i in range(v.shape[0]):
        gi = gradient(g, m, i)
        out[i] = cast_to(out, dx_value(gi, load(v[i]), mean, mean_dy, k, scale))
        store(dres, i, gi)


# The ROWS statistics accumulate x - pivot, one pivot per channel (see
# fastbn.backends.cpu.reductions.channel_pivot); ``mean`` there is the block's
# mean of x - pivot.


@inline
def cols_sum(v, pivot, total):
    # total (and pivot) float64, or float32 for the half types (blocks of at most LANE_BLOCK rows)
    for j in range(v.shape[0]):
        total[j] += cast_to(total, load(v[j])) - pivot[j]


# Two rows at a time: one load and store of each float64 accumulator per
# two elements instead of one (the accumulators live in L1, and loading and
# storing them bounds the one-row loops; measured 20% faster).


@inline
def cols_sum2(a, b, pivot, total):
    for j in range(a.shape[0]):
        total[j] += (cast_to(total, load(a[j])) - pivot[j]) + (cast_to(total, load(b[j])) - pivot[j])


@elementwise
def centred_block_moments(centre, pivot, dev, m2, size, mean_out, m2_out):
    """A block's mean (relative to the pivot) and M2 from its sums of d = x - centre and d^2 (the corrected
    two-pass), compiled without reassociation: ``(centre - pivot) + dev / size`` reordered as ``centre +
    (dev / size - pivot)`` would round at x's own magnitude, an error of the block's mean that Chan's merge
    multiplies by the distance between blocks' means (4e-9 of the variance, measured, at a mean of 1e8
    spreads)."""
    for c in range(centre.shape[0]):
        d = np.float64(dev[c])  # float64 throughout: the half types' centres, pivots and sums are float32
        mean_out[c] = (np.float64(centre[c]) - np.float64(pivot[c])) + d / size
        value = np.float64(m2[c]) - d * d / size
        m2_out[c] = 0.0 if value < 0.0 else value


# The ROWS statistics' pass 2 (reductions.rows_block_lanes, and stats_rows for the other dtypes): sums
# of d = x - c and d^2 around each channel's centre c (near its mean), rows in pairs; each deviation is
# one subtraction, which no reassociation can round at x's own magnitude.


@inline
def cols_centred_sums(v, centre, m2, dev):
    for j in range(v.shape[0]):
        d = load(v[j]) - centre[j]
        m2[j] += d * d
        dev[j] += d


@inline
def cols_centred_sums2(a, b, centre, m2, dev):
    for j in range(a.shape[0]):
        da = load(a[j]) - centre[j]
        db = load(b[j]) - centre[j]
        m2[j] += da * da + db * db
        dev[j] += da + db


@inline
def cols_grad_sums2(ga, ma, a, gb, mb, b, mean, sum_dy, dotp):
    # sum_dy, dotp (and mean) float64, or float32 for the half types' blocks of LANE_BLOCK rows
    for j in range(a.shape[0]):
        g0 = cast_to(sum_dy, gradient(ga, ma, j))
        g1 = cast_to(sum_dy, gradient(gb, mb, j))
        sum_dy[j] += g0 + g1
        dotp[j] += (cast_to(dotp, load(a[j])) - mean[j]) * g0 + (cast_to(dotp, load(b[j])) - mean[j]) * g1


@elementwise
def cols_affine(v, z, out, mean, scale, shift, floor):
    for j in range(v.shape[0]):
        out[j] = cast_to(out, clamp_below(plus(affine_value(load(v[j]), mean[j], scale[j]) + shift[j], z, j), floor))


# A block of rows in one call: a call per row of C elements costs more than the row's
# arithmetic when C is small (64 channels: 4 vectors).  The same per-element formulas,
# compiled the same way, so the bits equal cols_affine's and cols_dx's.


@elementwise
def rows_affine(x, z, y, r0, r1, mean, scale, shift, floor):
    # rows r0..r1-1 of cols_affine
    for r in range(r1 - r0):
        v = x[r0 + r]
        zr = part(z, r0 + r)
        out = y[r0 + r]
        for j in range(v.shape[0]):
            out[j] = cast_to(
                out, clamp_below(plus(affine_value(load(v[j]), mean[j], scale[j]) + shift[j], zr, j), floor)
            )


@elementwise
def rows_dx(dy, m, x, dx, dres, r0, r1, mean, mean_dy, k, scale):
    # rows r0..r1-1 of cols_dx
    for r in range(r1 - r0):
        g = dy[r0 + r]
        mr = part(m, r0 + r)
        v = x[r0 + r]
        out = dx[r0 + r]
        dr = part(dres, r0 + r)
        for j in range(v.shape[0]):
            gj = gradient(g, mr, j)
            out[j] = cast_to(out, dx_value(gj, load(v[j]), mean[j], mean_dy[j], k[j], scale[j]))
            store(dr, j, gj)


@inline
def cols_grad_sums(g, m, v, mean, sum_dy, dotp):
    for j in range(v.shape[0]):
        gj = cast_to(sum_dy, gradient(g, m, j))
        sum_dy[j] += gj
        dotp[j] += (cast_to(dotp, load(v[j])) - mean[j]) * gj


@elementwise
def cols_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    for j in range(v.shape[0]):
        gj = gradient(g, m, j)
        out[j] = cast_to(out, dx_value(gj, load(v[j]), mean[j], mean_dy[j], k[j], scale[j]))
        store(dres, j, gj)
