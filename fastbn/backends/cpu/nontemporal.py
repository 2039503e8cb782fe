"""Non-temporal ("streaming") stores for the CPU kernels' output passes.

An ordinary store to a line that is not in cache first reads the line from
DRAM (read-for-ownership), so writing an output of B bytes moves 2B.  A
non-temporal store writes whole lines around the cache, moving B: this is
how ``np.copyto`` (glibc's ``memcpy``) reaches the bandwidth the benchmarks
call the roofline.  With them, fastbn's eval forward, a pure elementwise pass,
runs at about the speed of ``np.copyto`` on the same tensor (the "% roofline"
column of ``python -m fastbn bench``).

LLVM's loop vectoriser refuses to vectorise a loop of non-temporal scalar
stores (x86 requires them aligned to the vector width), so the kernels
compute a chunk of output into a small scratch buffer with their ordinary
loops, and :func:`stream_copy` moves it out: element stores up to the first
64-byte boundary, aligned non-temporal vector stores as wide as the CPU
allows (32 or 64 bytes) for the whole lines, element stores for the rest, then a store fence.

Streaming only pays when the output does not fit in cache (the next reader
would otherwise find it there), so the callers turn it on by output size;
the values written are the same either way.
"""

from __future__ import annotations

import platform

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from fastbn.backends.cpu.machine import machine

# Bytes of one vector store: the widest the CPU's flags allow (64 with
# AVX-512F, 32 with AVX, 16 otherwise; see machine.vector_width).  Compiled
# into the kernels; any of these values writes the same bytes (a store wider
# than the compile target's registers is split by LLVM), so a kernel cached
# under another reading is still correct.
_VECTOR_BYTES = machine().vector_bytes
# Whole cache lines are streamed; the partial lines at either end of a
# chunk are written with ordinary stores.
_LINE_BYTES = 64
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@intrinsic
def _address(typingctx, array):
    """The address of ``array``'s first element, as an integer."""
    sig = types.intp(array)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return sig, codegen


@intrinsic
def _store_vector(typingctx, dst, i, src, j):
    """Non-temporal store of the _VECTOR_BYTES at ``src[j:]`` to ``dst[i:]``; ``&dst[i]`` must be so aligned."""
    sig = types.void(dst, i, src, j)

    def codegen(context, builder, signature, args):
        dst_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        src_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        vector = ir.VectorType(ir.IntType(64), _VECTOR_BYTES // 8).as_pointer()
        value = builder.load(
            builder.bitcast(builder.gep(src_data, [args[3]]), vector), align=signature.args[2].dtype.bitwidth // 8
        )
        store = builder.store(value, builder.bitcast(builder.gep(dst_data, [args[1]]), vector), align=_VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):
    """Order the non-temporal stores before everything after (x86 ``sfence``; a full fence elsewhere)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            function = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(function, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@numba.njit
def stream_copy(dst, src):
    """``dst[:] = src[:len(dst)]`` for 1-D contiguous arrays of one dtype, whole lines written around the cache.

    ``src`` is the scratch buffer the caller computed the values into (in
    L1); ``dst`` is the output.  Ends with a store fence, so the values are
    visible to any thread that synchronises with this one afterwards.
    """
    n = dst.shape[0]
    size = dst.itemsize
    per_vector = _VECTOR_BYTES // size
    address = _address(dst)
    head = n
    if address % size == 0:  # always, for NumPy's own allocations; else no aligned vector store is possible
        head = min(n, ((_LINE_BYTES - address % _LINE_BYTES) % _LINE_BYTES) // size)
    for i in range(head):
        dst[i] = src[i]
    per_line = _LINE_BYTES // size
    lines = (n - head) // per_line
    for k in range(lines * (_LINE_BYTES // _VECTOR_BYTES)):
        i = head + k * per_vector
        _store_vector(dst, i, src, i)
    for i in range(head + lines * per_line, n):
        dst[i] = src[i]
    _store_fence()
