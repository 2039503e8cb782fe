"""Sums over explicit float32 vector lanes, in an order fixed by the code rather than by the compiler.

The statistics of float32 input are memory-bound only if they are computed
in float32 vector lanes: widening every element to float64 costs a
conversion, and the float64 vectors hold half as many elements, which on a
CPU that runs 512-bit vectors as two 256-bit halves (AMD's Zen 4) made the
statistics two to three times slower than reading the tensor.  Summing in
float32 is accurate only over short stretches, and a loop compiled with
'reassoc' may sum its elements in any order, so an error bound for such a
loop has to assume the worst order over the whole block it sums.

These intrinsics fix the order instead, by emitting the loop themselves:

* the run is read in vectors of ``WIDTH`` = 16 float32 lanes; lane j of a
  vector holds element 16 k + j;
* ``BLOCK`` = 8 consecutive vectors form a block: each lane's 8 terms are
  added as a balanced tree ``((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 +
  t7))``, three float32 additions deep;
* each block's 16 lane sums are widened to float64 and added to 16 float64
  lane accumulators; the vectors after the last whole block are added one by
  one into float32 lanes (at most 7 terms a lane), widened and added the
  same way;
* the 16 float64 lanes are added in a fixed tree at the end; the caller adds
  the last ``len % 16`` elements in float64.

No instruction carries a fast-math flag, so LLVM keeps this order (and
rounds every operation as written) whatever it inlines or vectorises; the
results are the same bits on every x86-64 CPU, with AVX-512, AVX2 or SSE
(the 512-bit vectors are split into narrower ones), and on any other.

Error of a sum S of terms t_i (each rounded once to float32 before it is
summed, as in t_i = fl(x_i - c)): a term passes through at most 3 float32
additions in its block's tree, or at most 7 in the last partial block, then
float64 additions (at most len / 128 + 4 of them, u64 = 2^-53 each), so

    |S_computed - sum(t_i)| <= (7 u + (len / 128 + 4) u64) sum |t_i|,  u = 2^-24,

to first order, and 3 u in place of 7 u for the elements in whole blocks.
The callers' bounds (``fastbn.backends.cpu.reductions``, "error bound") are
built on this one.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastbn.backends.cpu.jit import inline
from fastbn.backends.cpu.loops import gradient, run_grad_sums, run_grad_sums_narrow

#: float32 lanes per vector (64 bytes: one AVX-512 register, two AVX2 ones).
WIDTH = 16
#: Vectors per block: each lane's terms of a block are summed as a tree of depth 3.
BLOCK = 8

_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V32 = ir.VectorType(_F32, WIDTH)
_V64 = ir.VectorType(_F64, WIDTH // 2)


def _mask(values: range) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _tree(builder: ir.IRBuilder, terms: list[ir.Value]) -> ir.Value:
    """Balanced pairwise sum of ``terms`` (a power of two of them), in a fixed order."""
    while len(terms) > 1:
        terms = [builder.fadd(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
    return terms[0]


def _splat(builder, value):
    """A vector of ``WIDTH`` copies of the float32 ``value``."""
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(_V32, ir.Undefined), value, ir.Constant(_I32, 0)),
        ir.Constant(_V32, ir.Undefined),
        ir.Constant(ir.VectorType(_I32, WIDTH), [0] * WIDTH),
    )


class _Run:
    """A 1-D C-contiguous float32 argument of an intrinsic: its length and vector ``k`` (elements 16 k ...)."""

    def __init__(self, context, builder, array_type, array):
        self.builder = builder
        self.data = context.make_array(array_type)(context, builder, array)
        self.length = cgutils.unpack_tuple(builder, self.data.shape, 1)[0]

    def vector(self, index):
        first = self.builder.gep(self.data.data, [self.builder.mul(index, ir.Constant(_I64, WIDTH))])
        return self.builder.load(self.builder.bitcast(first, _V32.as_pointer()), align=4)


def _lane_sums(builder, length, terms_of, outputs):
    """Emit the loop of the module's order over ``length // 16`` vectors; returns ``outputs`` float64 sums.

    ``terms_of(k)`` emits the ``outputs`` float32 term vectors of vector ``k``.
    """
    # per output, the float64 accumulators of lanes 0..7 and 8..15
    zeros = ir.Constant(_V64, [0.0] * (WIDTH // 2))
    wide = [[cgutils.alloca_once_value(builder, zeros) for _ in range(2)] for _ in range(outputs)]

    def widen_into(sums):
        for total, (low, high) in zip(sums, wide):
            for half, slot in ((range(0, WIDTH // 2), low), (range(WIDTH // 2, WIDTH), high)):
                part = builder.fpext(builder.shuffle_vector(total, total, _mask(half)), _V64)
                builder.store(builder.fadd(builder.load(slot), part), slot)

    vectors = builder.lshr(length, ir.Constant(_I64, 4))
    blocks = builder.lshr(vectors, ir.Constant(_I64, 3))
    with cgutils.for_range(builder, blocks) as loop:
        first = builder.mul(loop.index, ir.Constant(_I64, BLOCK))
        terms = [terms_of(builder.add(first, ir.Constant(_I64, k))) for k in range(BLOCK)]
        widen_into([_tree(builder, [t[j] for t in terms]) for j in range(outputs)])

    partial = [cgutils.alloca_once_value(builder, ir.Constant(_V32, [0.0] * WIDTH)) for _ in range(outputs)]
    done = builder.mul(blocks, ir.Constant(_I64, BLOCK))
    with cgutils.for_range(builder, builder.sub(vectors, done)) as loop:
        for slot, term in zip(partial, terms_of(builder.add(done, loop.index))):
            builder.store(builder.fadd(builder.load(slot), term), slot)
    widen_into([builder.load(slot) for slot in partial])

    results = []
    for low, high in wide:
        lanes = builder.fadd(builder.load(low), builder.load(high))
        each = [builder.extract_element(lanes, ir.Constant(_I32, j)) for j in range(WIDTH // 2)]
        results.append(_tree(builder, each))
    return results


def _check(v, centre) -> None:
    if not (isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C" and v.dtype == types.float32):
        raise TypeError(f"lane sums take a 1-D C-contiguous float32 array, got {v}")
    if centre != types.float32:
        raise TypeError(f"lane sums take a float32 centre, got {centre}")


@intrinsic
def lane_sum(typingctx, v, centre):
    """``sum(fl32(v[i] - centre))`` over ``v[:len(v) // 16 * 16]``, in float64, in the module's fixed order."""
    _check(v, centre)
    sig = types.float64(v, centre)

    def codegen(context, builder, signature, args):
        run = _Run(context, builder, signature.args[0], args[0])
        c = _splat(builder, args[1])
        return _lane_sums(builder, run.length, lambda k: [builder.fsub(run.vector(k), c)], 1)[0]

    return sig, codegen


@intrinsic
def lane_sums_sq(typingctx, v, centre):
    """``(sum(d), sum(fl32(d * d)))`` with ``d = fl32(v[i] - centre)`` over ``v[:len(v) // 16 * 16]``, in float64."""
    _check(v, centre)
    sig = types.UniTuple(types.float64, 2)(v, centre)

    def codegen(context, builder, signature, args):
        run = _Run(context, builder, signature.args[0], args[0])
        c = _splat(builder, args[1])

        def terms(k):
            d = builder.fsub(run.vector(k), c)
            return [d, builder.fmul(d, d)]

        sums = _lane_sums(builder, run.length, terms, 2)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def lane_grad_sums(typingctx, g, mask, v, centre):
    """``(sum(gm), sum(fl32(fl32(v[i] - centre) * gm)))`` over the first ``len(v) // 16 * 16`` elements, float64.

    ``gm`` is ``g[i]`` where ``mask[i] > 0`` (the ReLU's output; NaN passes nothing), else 0; ``g[i]``
    when ``mask`` is None.  ``g`` and ``mask`` at least as long as ``v``.
    """
    _check(v, centre)
    _check(g, centre)
    if not isinstance(mask, types.NoneType):
        _check(mask, centre)
    sig = types.UniTuple(types.float64, 2)(g, mask, v, centre)

    def codegen(context, builder, signature, args):
        gs = _Run(context, builder, signature.args[0], args[0])
        ms = (
            None
            if isinstance(signature.args[1], types.NoneType)
            else _Run(context, builder, signature.args[1], args[1])
        )
        xs = _Run(context, builder, signature.args[2], args[2])
        c = _splat(builder, args[3])
        zero = ir.Constant(_V32, [0.0] * WIDTH)

        def terms(k):
            gk = gs.vector(k)
            if ms is not None:
                gk = builder.select(builder.fcmp_ordered(">", ms.vector(k), zero), gk, zero)
            return [gk, builder.fmul(builder.fsub(xs.vector(k), c), gk)]

        sums = _lane_sums(builder, xs.length, terms, 2)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


# ------------------------------------------------------- runs of a kernel ---
# The per-run helpers of the reductions (fastbn.backends.cpu.reductions) on the intrinsics: the whole
# vectors in lanes, the last len % 16 elements in float64.


@inline
def run_lane_sum(v, centre):
    """``sum(x - centre)`` of a float32 run: :func:`lane_sum` on its whole vectors, the rest in float64."""
    n = v.shape[0]
    total = lane_sum(v, centre)
    c = np.float64(centre)
    for i in range(n - n % WIDTH, n):
        total += np.float64(v[i]) - c
    return total


@inline
def run_lane_sums_sq(v, centre):
    """``(sum(d), sum(d^2))``, ``d = x - centre``, of a float32 run: :func:`lane_sums_sq`, the rest in float64."""
    n = v.shape[0]
    dev, sq = lane_sums_sq(v, centre)
    c = np.float64(centre)
    for i in range(n - n % WIDTH, n):
        d = np.float64(v[i]) - c
        dev += d
        sq += d * d
    return dev, sq


@inline
def run_grad_sums_lanes(g, m, v, mean):
    # run_grad_sums of a float32 run: float32 lanes (lane_grad_sums) around the float32 mean m32,
    # the last len % 16 elements in float64, then corrected to the mean as run_grad_sums_narrow does.
    m32 = np.float32(mean)
    sum_dy, dotp = lane_grad_sums(g, m, v, m32)
    n = v.shape[0]
    c = np.float64(m32)
    for i in range(n - n % WIDTH, n):
        gi = np.float64(gradient(g, m, i))
        sum_dy += gi
        dotp += (np.float64(v[i]) - c) * gi
    shift = c - mean
    return sum_dy, dotp if shift == 0.0 else dotp + shift * sum_dy  # (0 * inf would be NaN)


def run_gradient_sums(g, m, v, mean):
    """``(sum(g), sum((x - mean) * g))`` of a run: float64 sums (float64 input), float32 lanes (float32), or
    float32 blocks (half types)."""


@overload(run_gradient_sums, inline="always")
def _run_gradient_sums_impl(g, m, v, mean):
    if v.dtype in (types.uint16, types.int16):
        return lambda g, m, v, mean: run_grad_sums_narrow(g, m, v, mean)
    if v.dtype == types.float32:
        return lambda g, m, v, mean: run_grad_sums_lanes(g, m, v, mean)
    return lambda g, m, v, mean: run_grad_sums(g, m, v, mean)
