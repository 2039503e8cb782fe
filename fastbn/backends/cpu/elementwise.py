"""CPU elementwise kernels: the normalised output and dx, with ordinary or non-temporal stores.

Each task hands its block of output to an ``emit_*`` helper with a
``scratch`` buffer: None for ordinary stores (the per-run loops write the
output directly), or an L1-sized buffer for non-temporal stores, which the
plan takes for outputs larger than the cache (the kernels' ``nt`` argument).
The block, a span of the output's flat (C-order) index, is then computed
chunk by chunk into the scratch buffer that
:func:`fastbn.backends.cpu.nontemporal.stream_copy` writes around the cache:
whole spans, because short runs streamed one by one leave partial lines at
both ends.  The choice is made when Numba types a kernel, so kernels for
small outputs compile exactly as without it, and each element is computed
by the same per-run helper either way, so it never changes a value.
"""

from __future__ import annotations

from numba import prange, types
from numba.extending import overload

from fastbn.backends.cpu.jit import borrowed, elementwise, kernel
from fastbn.backends.cpu.loops import (
    cols_affine,
    cols_dx,
    flat,
    part,
    row_block,
    rows_affine,
    rows_dx,
    run_affine,
    run_dx,
    scratch_for,
    stream_out,
)
from fastbn.backends.cpu.nontemporal import stream_copy
from fastbn.backends.cpu.plan import STREAM_CHUNK


# ---------------------------------------------------------- output spans ---
@elementwise
def _slab_stream_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y_flat, scratch):
    # y[n, c0:c1], the span of flat elements (n * C + c0) * L onwards, chunk by chunk through scratch.  The
    # walk keeps its place as (channel, column) rather than dividing flat positions (integer division costs
    # more than a short run's arithmetic).
    _, C, L = x.shape
    step = scratch.shape[0]
    start = (n * C + c0) * L
    filled = 0
    for c in range(c0, c1):
        i = 0
        while i < L:
            take = min(L - i, step - filled)
            run_affine(
                x[n, c, i : i + take],
                part(z, (n, c, slice(i, i + take))),
                scratch[filled : filled + take],
                mean[c - offset],
                scale[c - offset],
                shift[c - offset],
                floor,
            )
            filled += take
            i += take
            if filled == step:
                stream_copy(y_flat[start : start + step], scratch)
                start += step
                filled = 0
    stream_copy(y_flat[start : start + filled], scratch[:filled])


def emit_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
    """y[n, c0:c1] of an (N, C, L) view, coefficients indexed by channel - offset; scratch as above."""


@overload(emit_affine, inline="always")
def _emit_affine_impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
    if isinstance(scratch, types.NoneType):

        def impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
            for c in range(c0, c1):
                run_affine(
                    x[n, c], part(z, (n, c)), y[n, c], mean[c - offset], scale[c - offset], shift[c - offset], floor
                )

        return impl

    def impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
        _slab_stream_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y.reshape(-1), scratch)

    return impl


@elementwise
def _slab_stream_dx(dy, m, x, mean, mean_dy, k, scale, offset, n, c0, c1, dx_flat, dres_flat, scratch, dres_scratch):
    # dx[n, c0:c1] (and dres), walked as in _slab_stream_affine.
    _, C, L = x.shape
    step = scratch.shape[0]
    start = (n * C + c0) * L
    filled = 0
    for c in range(c0, c1):
        i = 0
        while i < L:
            take = min(L - i, step - filled)
            run_dx(
                dy[n, c, i : i + take],
                part(m, (n, c, slice(i, i + take))),
                x[n, c, i : i + take],
                scratch[filled : filled + take],
                part(dres_scratch, slice(filled, filled + take)),
                mean[c - offset],
                mean_dy[c - offset],
                k[c - offset],
                scale[c - offset],
            )
            filled += take
            i += take
            if filled == step:
                stream_copy(dx_flat[start : start + step], scratch)
                stream_out(part(dres_flat, slice(start, start + step)), dres_scratch)
                start += step
                filled = 0
    stream_copy(dx_flat[start : start + filled], scratch[:filled])
    stream_out(part(dres_flat, slice(start, start + filled)), part(dres_scratch, slice(0, filled)))


def emit_dx(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
    """dx[n, c0:c1] (and dres) of (N, C, L) views, coefficients indexed by channel - offset; scratch as above."""


@overload(emit_dx, inline="always")
def _emit_dx_impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
    if isinstance(scratch, types.NoneType):

        def impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
            for c in range(c0, c1):
                run_dx(
                    dy[n, c],
                    part(m, (n, c)),
                    x[n, c],
                    dx[n, c],
                    part(dres, (n, c)),
                    mean[c - offset],
                    mean_dy[c - offset],
                    k[c - offset],
                    scale[c - offset],
                )

        return impl

    def impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
        _slab_stream_dx(
            dy, m, x, mean, mean_dy, k, scale, offset, n, c0, c1, dx.reshape(-1), flat(dres), scratch, dres_scratch
        )

    return impl


@elementwise
def _rows_stream_affine(x, z, mean, scale, shift, floor, r0, r1, y_flat, scratch):
    C = x.shape[1]
    step = scratch.shape[0] // C
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        for r in range(e - s):
            cols_affine(x[s + r], part(z, s + r), scratch[r * C : (r + 1) * C], mean, scale, shift, floor)
        stream_copy(y_flat[s * C : e * C], scratch)


def emit_rows_affine(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
    """Rows r0..r1-1 of y for an (M, C) view; scratch as above, of at least C elements."""


@overload(emit_rows_affine, inline="always")
def _emit_rows_affine_impl(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
    if isinstance(scratch, types.NoneType):

        def impl(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
            rows_affine(x, z, y, r0, r1, mean, scale, shift, floor)

        return impl
    return lambda x, z, mean, scale, shift, floor, r0, r1, y, scratch: _rows_stream_affine(
        x, z, mean, scale, shift, floor, r0, r1, y.reshape(-1), scratch
    )


@elementwise
def _rows_stream_dx(dy, m, x, mean, mean_dy, k, scale, r0, r1, dx_flat, dres_flat, scratch, dres_scratch):
    C = x.shape[1]
    step = scratch.shape[0] // C
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        for r in range(e - s):
            cols_dx(
                dy[s + r],
                part(m, s + r),
                x[s + r],
                scratch[r * C : (r + 1) * C],
                part(dres_scratch, slice(r * C, (r + 1) * C)),
                mean,
                mean_dy,
                k,
                scale,
            )
        stream_copy(dx_flat[s * C : e * C], scratch)
        stream_out(part(dres_flat, slice(s * C, e * C)), dres_scratch)


def emit_rows_dx(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
    """Rows r0..r1-1 of dx (and dres) for (M, C) views; scratch as in :func:`emit_rows_affine`."""


@overload(emit_rows_dx, inline="always")
def _emit_rows_dx_impl(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
    if isinstance(scratch, types.NoneType):

        def impl(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
            rows_dx(dy, m, x, dx, dres, r0, r1, mean, mean_dy, k, scale)

        return impl
    return lambda dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch: _rows_stream_dx(
        dy, m, x, mean, mean_dy, k, scale, r0, r1, dx.reshape(-1), flat(dres), scratch, dres_scratch
    )


@kernel
def normalize_slab(x, z, mean, scale, shift, floor, y, group, nt):
    """y = max((x - mean) * scale + shift + z, floor) per channel of an (N, C, L) view, streamed; z may be None.

    A task is one outer row of ``group`` channels (see ``run_group``).
    """
    x = borrowed(x)
    z = borrowed(z)
    mean = borrowed(mean)
    scale = borrowed(scale)
    shift = borrowed(shift)
    floor = borrowed(floor)
    y = borrowed(y)
    nt = borrowed(nt)
    N, C, _ = x.shape
    tasks = (C + group - 1) // group
    for t in prange(N * tasks):
        n = t // tasks
        c0 = (t - n * tasks) * group
        emit_affine(x, z, mean, scale, shift, floor, 0, n, c0, min(C, c0 + group), y, scratch_for(nt, y, STREAM_CHUNK))


@kernel
def backward_elementwise_slab(dy, m, x, dres, mean, mean_dy, k, scale, dx, group, nt):
    """dx = (g - mean_dy - (x - mean) * k) * scale per channel of (N, C, L) views, streamed.

    ``g`` is dy masked by the ReLU output ``m`` (or dy if None); ``dres = g``
    unless None.  Tasks as in :func:`normalize_slab`.
    """
    dy = borrowed(dy)
    m = borrowed(m)
    x = borrowed(x)
    dres = borrowed(dres)
    mean = borrowed(mean)
    mean_dy = borrowed(mean_dy)
    k = borrowed(k)
    scale = borrowed(scale)
    dx = borrowed(dx)
    nt = borrowed(nt)
    N, C, _ = x.shape
    tasks = (C + group - 1) // group
    for t in prange(N * tasks):
        n = t // tasks
        c0 = (t - n * tasks) * group
        emit_dx(
            dy,
            m,
            x,
            dres,
            mean,
            mean_dy,
            k,
            scale,
            0,
            n,
            c0,
            min(C, c0 + group),
            dx,
            scratch_for(nt, dx, STREAM_CHUNK),
            scratch_for(nt, dres, STREAM_CHUNK),
        )


@kernel
def normalize_rows(x, z, mean, scale, shift, floor, y, nt):
    """y = max((x - mean) * scale + shift + z, floor) per channel of an (M, C) view; z may be None."""
    x = borrowed(x)
    z = borrowed(z)
    mean = borrowed(mean)
    scale = borrowed(scale)
    shift = borrowed(shift)
    floor = borrowed(floor)
    y = borrowed(y)
    nt = borrowed(nt)
    M, C = x.shape
    rows, nblocks = row_block(M, C)
    for b in prange(nblocks):
        r0 = b * rows
        emit_rows_affine(
            x, z, mean, scale, shift, floor, r0, min(M, r0 + rows), y, scratch_for(nt, y, STREAM_CHUNK // C * C + C)
        )


@kernel
def backward_elementwise_rows(dy, m, x, dres, mean, mean_dy, k, scale, dx, nt):
    """dx = (g - mean_dy - (x - mean) * k) * scale per channel of (M, C) views; g, dres as in the SLAB kernel."""
    dy = borrowed(dy)
    m = borrowed(m)
    x = borrowed(x)
    dres = borrowed(dres)
    mean = borrowed(mean)
    mean_dy = borrowed(mean_dy)
    k = borrowed(k)
    scale = borrowed(scale)
    dx = borrowed(dx)
    nt = borrowed(nt)
    M, C = x.shape
    rows, nblocks = row_block(M, C)
    for b in prange(nblocks):
        r0 = b * rows
        size = STREAM_CHUNK // C * C + C
        emit_rows_dx(
            dy,
            m,
            x,
            dres,
            mean,
            mean_dy,
            k,
            scale,
            r0,
            min(M, r0 + rows),
            dx,
            scratch_for(nt, dx, size),
            scratch_for(nt, dres, size),
        )
