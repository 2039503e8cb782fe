"""The CUDA backend's fused and extended batch norm against the float64 oracle.

ReLU, a residual added before it, ghost batches (``groups``) and batch
renormalization, forward and backward, with GPU arrays: mostly on the
backend's operations (:data:`fastbn.backends.cuda.ops.BACKEND`, called as
fastbn._api calls them after validation), and once through the public
functions.  Every dtype, rank, channel axis and memory layout of the shared
strategies, with the residual and dy in layouts of their own; fixed cases
for the multi-block, multi-launch and clipping paths.  Tolerances are
strategies.TOLERANCES, with the conditioning scales of tests/test_forward.py
extended to each option (see the helpers below).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pytest
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn.backends.cuda import plan, target, views
from fastbn.backends.cuda.ops import BACKEND

from gpu_arrays import forbid_transfers, gpu, host, small_forward_inputs
from oracle import oracle_backward_extended, oracle_forward_extended
from strategies import (
    ForwardInputs,
    assert_close,
    backward_scales,
    invstd_scale,
    layouts,
    like,
    make_params,
    mean_scale,
    output_tol,
    place,
    stats_tol,
    var_scale,
    y_scale,
)

# Each example runs a forward and a backward in the simulator (about a second): few examples.
FEW = settings(max_examples=max(12, settings().max_examples // 2))
RMAX = (1.0, 1.1, 2.0, 5.0)  # 1.0 pins r to 1; 1.1 and 2.0 clip often on the drawn data
DMAX = (0.0, 0.05, 0.5, 5.0)


def note_case(text):
    """hypothesis.event (the option mix shows with --hypothesis-show-statistics), in property tests only."""
    if currently_in_test_context():
        event(text)


def dev(array, name="array"):
    """A host array as the dispatcher hands it to the backend: a device array over its memory."""
    return None if array is None else BACKEND.to_backend(gpu(array), name)


# ------------------------------------------------------------------ inputs ---
@dataclass(frozen=True)
class FusedInputs:
    """Forward inputs plus the fused and extended options."""

    inp: ForwardInputs
    relu: bool
    residual: np.ndarray | None
    groups: int
    renorm: tuple | None

    @property
    def batch_stats(self):
        return self.inp.training or self.inp.params.running_mean is None

    @property
    def virtual_batch_size(self):
        return None if self.groups == 1 else self.inp.case.x.shape[0] // self.groups


@st.composite
def fused_inputs(draw, relu=None, residual=None, groups=None, renorm=None, **inputs_kw):
    """Small forward inputs with drawn options (pin any of them with a bool; ``inputs_kw`` go to
    small_forward_inputs).  ``groups=True`` and ``renorm=True`` apply where they can: ghost batches
    need batch statistics and a shape that splits, renormalization training with running stats."""
    inp = draw(small_forward_inputs(**inputs_kw))
    case = inp.case
    x = case.x

    def pick(value, label):
        return draw(st.booleans(), label=label) if value is None else value

    z = None
    if pick(residual, "residual"):
        z_layout = draw(layouts(x.ndim), label="residual layout")
        z = like(case, case.rng(3).standard_normal(x.shape) * case.scale, layout=z_layout)
    batch_stats = inp.training or inp.params.running_mean is None
    # Ghost batches: axis 0 is not the channel axis, divides into G groups of at least 2 values per channel.
    divisors = [g for g in (2, 3, 4) if case.channel != 0 and x.shape[0] % g == 0 and case.count // g >= 2]
    g = 1
    if batch_stats and divisors and pick(groups, "groups"):
        g = draw(st.sampled_from(divisors), label="G")
    r = None
    if inp.training and inp.params.running_mean is not None and g == 1 and pick(renorm, "renorm"):
        r = (draw(st.sampled_from(RMAX), label="rmax"), draw(st.sampled_from(DMAX), label="dmax"))
    return FusedInputs(inp, pick(relu, "relu"), z, g, r)


def run_forward(f, rm, rv):
    """The backend's forward as the API calls it: returns (y, mean, invstd, r, d) as device arrays."""
    inp, p, case = f.inp, f.inp.params, f.inp.case
    x, w, b = dev(case.x, "x"), dev(p.weight, "weight"), dev(p.bias, "bias")
    rm = None if rm is None else BACKEND.to_backend(rm, "running_mean")
    rv = None if rv is None else BACKEND.to_backend(rv, "running_var")
    z = dev(f.residual, "residual")
    if f.batch_stats:
        return BACKEND.forward_batch(
            x,
            case.channel,
            case.sdtype,
            w,
            b,
            inp.eps,
            rm,
            rv,
            inp.momentum,
            update=inp.training and rm is not None,
            relu=f.relu,
            residual=z,
            renorm=f.renorm,
            groups=f.groups,
        )
    y, mean, invstd = BACKEND.forward_eval(x, case.channel, case.sdtype, w, b, inp.eps, rm, rv, relu=f.relu, residual=z)
    return y, mean, invstd, None, None


def run_oracle(f):
    inp, p = f.inp, f.inp.params
    return oracle_forward_extended(
        inp.case.x,
        p.weight,
        p.bias,
        running_mean=p.running_mean,
        running_var=p.running_var,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=inp.case.axis,
        activation="relu" if f.relu else None,
        residual=f.residual,
        virtual_batch_size=f.virtual_batch_size,
        renorm=f.renorm,
    )


# ---------------------------------------------------------- tolerance scales ---
def _group_rows(array, groups):
    """The G ghost batches of a logical array (consecutive samples along axis 0)."""
    return np.split(np.asarray(array), groups, axis=0)


def _per_group(o, groups, channels):
    """The oracle's mean and invstd as (G, C) rows."""
    return np.reshape(o.mean, (groups, channels)), np.reshape(o.invstd, (groups, channels))


def _renorm_coefficients(f, o):
    """Batch renormalization's effective weight r w and the bias scale it brings.

    d = (mean - running_mean) / sigma_running carries the mean's rounding error
    (about u mean_scale) divided by sigma_running, times |w|, into y.
    """
    case, p = f.inp.case, f.inp.params
    w = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    b = np.zeros(case.channels) if p.bias is None else np.abs(p.bias.astype(np.float64))
    if o.r is None:
        return w, b
    sigma_running = np.sqrt(p.running_var.astype(np.float64) + f.inp.eps)
    extra = np.abs(w) * mean_scale(case.x, o.mean, case.axis) / sigma_running
    return o.r * w, np.abs(o.d * w) + b + extra


def forward_y_scale(f, o, tol):
    """y's conditioning scale: y_scale per group, with renormalization's coefficients, plus |z|."""
    case = f.inp.case
    weight, bias = _renorm_coefficients(f, o)
    means, invstds = _per_group(o, f.groups, case.channels)
    scale = np.concatenate(
        [
            y_scale(xg, m, i, weight, bias, case.axis, tol)
            for xg, m, i in zip(_group_rows(case.x, f.groups), means, invstds)
        ],
        axis=0,
    )
    if f.residual is not None:
        scale = scale + np.abs(f.residual.astype(np.float64))
    return scale


# ------------------------------------------------------------------ checks ---
def check_forward(f, result, rm, rv):
    """The backend's forward results against the oracle; returns the oracle's."""
    case, p, inp = f.inp.case, f.inp.params, f.inp
    y, mean, invstd, r, d = result
    o = run_oracle(f)
    out_tol, st_tol = output_tol(case.dtype), stats_tol(case.dtype)
    y_host = host(y)
    assert y_host.dtype == case.dtype and y_host.shape == case.x.shape
    assert_close(y_host, o.y, out_tol, scale=forward_y_scale(f, o, st_tol), what="y")
    if f.relu:
        assert not (y_host < 0).any()

    stats_shape = (case.channels,) if f.groups == 1 else (f.groups, case.channels)
    means, invstds = _per_group(o, f.groups, case.channels)
    for name, arr in (("mean", mean), ("invstd", invstd)):
        assert target.is_device_array(arr) and arr.dtype == case.sdtype, name
        assert tuple(arr.shape) == stats_shape, (name, arr.shape)
    got_mean = host(mean).reshape(f.groups, case.channels)
    got_invstd = host(invstd).reshape(f.groups, case.channels)
    for g, xg in enumerate(_group_rows(case.x, f.groups)):
        assert_close(got_mean[g], means[g], st_tol, scale=mean_scale(xg, means[g], case.axis), what=f"mean[{g}]")
        assert_close(
            got_invstd[g],
            invstds[g],
            st_tol,
            scale=invstd_scale(xg, means[g], invstds[g], case.axis, st_tol),
            what=f"invstd[{g}]",
        )

    if f.renorm is None:
        assert r is None and d is None
    else:
        assert tuple(r.shape) == tuple(d.shape) == (case.channels,) and r.dtype == d.dtype == case.sdtype
        sigma_running = np.sqrt(p.running_var.astype(np.float64) + inp.eps)
        k_rel = invstd_scale(case.x, o.mean, o.invstd, case.axis, st_tol) / o.invstd  # invstd's relative error
        assert_close(host(r), o.r, st_tol, scale=o.r * k_rel, what="r")
        assert_close(
            host(d), o.d, st_tol, scale=mean_scale(case.x, o.mean, case.axis) / sigma_running + np.abs(o.d), what="d"
        )
        rmax, dmax = f.renorm
        assert (host(r) >= np.float32(1 / rmax) * (1 - 1e-6)).all() and (host(r) <= rmax).all()
        assert (np.abs(host(d)) <= dmax).all()
        note_case(
            f"renorm: r clipped {bool(np.any(np.abs(np.log(o.r)) >= np.log(rmax)))}, "
            f"d clipped {bool(np.any(np.abs(o.d) >= dmax))}"
        )

    if p.running_mean is not None:
        if inp.training:
            m, n = inp.momentum, case.count // f.groups
            groups = list(zip(_group_rows(case.x, f.groups), means, invstds))
            m_scale = np.max([mean_scale(xg, mg, case.axis) for xg, mg, _ in groups], axis=0)
            v_scale = np.max(
                [var_scale(xg, mg, 1 / ig**2 - inp.eps, case.axis, st_tol) for xg, mg, ig in groups], axis=0
            )
            assert_close(rm, o.running_mean, st_tol, scale=np.abs(p.running_mean) + m * m_scale, what="running_mean")
            assert_close(
                rv, o.running_var, st_tol, scale=np.abs(p.running_var) + m * n / (n - 1) * v_scale, what="running_var"
            )
        else:
            assert rm.tobytes() == p.running_mean.tobytes() and rv.tobytes() == p.running_var.tobytes()
    return o


def check_backward(f, o, y_host, dy, r_host, d_host, result):
    """The backend's backward results against the oracle (given forward's y, r and d)."""
    case, p = f.inp.case, f.inp.params
    dx, dweight, dbias, dres = result
    e_dx, e_dweight, e_dbias, e_g = oracle_backward_extended(
        dy,
        case.x,
        p.weight,
        o.mean,
        o.invstd,
        o.batch_stats,
        case.axis,
        y=y_host if f.relu else None,
        r=r_host,
        d=d_host,
        virtual_batch_size=f.virtual_batch_size,
    )
    st_tol = stats_tol(case.dtype)
    w = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    if r_host is not None:
        w = r_host * w
    means, invstds = _per_group(o, f.groups, case.channels)
    scales = [
        backward_scales(xg, gg, m, i, w, case.axis, st_tol)
        for xg, gg, m, i in zip(_group_rows(case.x, f.groups), _group_rows(e_g, f.groups), means, invstds)
    ]
    dx_scale = np.concatenate([s[0] for s in scales], axis=0)
    dweight_scale = sum(s[1] for s in scales)
    dbias_scale = sum(s[2] for s in scales)
    if r_host is not None:
        dweight_scale = np.abs(r_host) * dweight_scale + np.abs(d_host) * dbias_scale

    mode = "training" if o.batch_stats else "eval"
    dx = host(dx)
    assert dx.dtype == case.dtype and dx.shape == case.x.shape
    for name, arr in (("dweight", dweight), ("dbias", dbias)):
        assert arr.dtype == case.sdtype and tuple(arr.shape) == (case.channels,), name
    assert_close(dx, e_dx, output_tol(case.dtype), scale=dx_scale, what=f"dx ({mode})")
    assert_close(host(dweight), e_dweight, st_tol, scale=dweight_scale, what=f"dweight ({mode})")
    assert_close(host(dbias), e_dbias, st_tol, scale=dbias_scale, what=f"dbias ({mode})")
    if f.residual is None:
        assert dres is None
    else:
        dres = host(dres)
        assert dres.dtype == case.dtype and dres.shape == case.x.shape
        np.testing.assert_array_equal(dres, e_g.astype(case.dtype), err_msg="dres")  # a copy of the masked dy


def run_backward(f, result, dy):
    """The backend's backward as the API calls it after this forward."""
    case, p = f.inp.case, f.inp.params
    y, mean, invstd, r, d = result
    return BACKEND.backward(
        dev(dy, "dy"),
        dev(case.x, "x"),
        case.channel,
        case.sdtype,
        dev(p.weight, "weight"),
        mean,
        invstd,
        f.batch_stats,
        y=y if f.relu else None,
        dresidual=f.residual is not None,
        r=r,
        d=d,
        groups=f.groups,
    )


def api_forward(f, rm, rv):
    """fastbn.forward with GPU arrays and the options' public names; returns the backend's five results."""
    inp, p, case = f.inp, f.inp.params, f.inp.case
    y, saved = fastbn.forward(
        gpu(case.x),
        gpu(p.weight),
        gpu(p.bias),
        running_mean=rm,
        running_var=rv,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
        activation="relu" if f.relu else None,
        residual=gpu(f.residual),
        virtual_batch_size=f.virtual_batch_size,
        renorm=f.renorm,
    )
    assert target.is_device_array(y)
    assert saved.count == case.count // f.groups and saved.residual == (f.residual is not None)
    assert saved.virtual_batch_size == f.virtual_batch_size and bool(saved.batch_stats) == f.batch_stats
    api_forward.saved = saved
    return y, saved.mean, saved.invstd, saved.r, saved.d


def api_backward(f, result, dy):
    """fastbn.backward after api_forward: 4 values with a residual, 3 without (then dres is None)."""
    case, p = f.inp.case, f.inp.params
    out = fastbn.backward(
        gpu(dy), gpu(case.x), gpu(p.weight), api_forward.saved, axis=case.axis, y=result[0] if f.relu else None
    )
    assert len(out) == (3 if f.residual is None else 4)
    return (*out, None) if f.residual is None else out


def forward_backward(f, dy_layout, forward=run_forward, backward=run_backward):
    """Forward, then backward with a dy of ``dy_layout``; both checked against the oracle.

    ``forward`` and ``backward`` call the backend directly (the default) or
    through fastbn's public functions (api_forward, api_backward).
    """
    case = f.inp.case
    note_case(
        f"G={f.groups} relu={f.relu} residual={f.residual is not None} renorm={f.renorm is not None} "
        f"batch_stats={f.batch_stats}"
    )
    x_before = case.x.copy()
    rm, rv = (gpu(a) for a in f.inp.running_copies())  # updated on the device, read back to check
    result = forward(f, rm, rv)
    o = check_forward(f, result, *(None if a is None else host(a) for a in (rm, rv)))
    y_host = host(result[0])
    r_host = None if result[3] is None else host(result[3]).astype(np.float64)
    d_host = None if result[4] is None else host(result[4]).astype(np.float64)
    dy = like(case, case.rng(2).standard_normal(case.x.shape), layout=dy_layout)
    check_backward(f, o, y_host, dy, r_host, d_host, backward(f, result, dy))
    assert np.array_equal(case.x, x_before, equal_nan=True)


# ---------------------------------------------------------- property tests ---
@FEW
@given(fused_inputs(), st.data())
def test_fused_forward_backward_match_oracle(f, data):
    """Every option, drawn independently, forward and backward."""
    forward_backward(f, data.draw(layouts(f.inp.case.x.ndim), label="dy layout"))


@FEW
@given(fused_inputs(), st.data())
def test_public_api_on_gpu_arrays_matches_oracle(f, data):
    """fastbn.forward(activation=, residual=, virtual_batch_size=, renorm=) and fastbn.backward(y=) on GPU
    arrays: validation, dispatch, Saved and the 3-or-4-value return around the same kernels."""
    forward_backward(f, data.draw(layouts(f.inp.case.x.ndim), label="dy layout"), api_forward, api_backward)


@FEW
@given(fused_inputs(relu=True, residual=True), st.data())
def test_residual_relu_match_oracle(f, data):
    """BN + add + ReLU (ghost batches and renormalization still drawn)."""
    forward_backward(f, data.draw(layouts(f.inp.case.x.ndim), label="dy layout"))


@FEW
@given(fused_inputs(groups=True, training=True).filter(lambda f: f.groups > 1), st.data())
def test_ghost_batches_match_oracle(f, data):
    """Ghost batch norm (G in 2..4), with or without ReLU and residual."""
    forward_backward(f, data.draw(layouts(f.inp.case.x.ndim), label="dy layout"))


@FEW
@given(fused_inputs(renorm=True, groups=False, training=True, running=True), st.data())
def test_renorm_matches_oracle(f, data):
    """Batch renormalization wherever running statistics are given (often clipping)."""
    forward_backward(f, data.draw(layouts(f.inp.case.x.ndim), label="dy layout"))


# ------------------------------------------------- launch paths, fixed cases ---
def _fixed(
    shape,
    axis,
    dtype=np.float32,
    layout=("contiguous", ()),
    *,
    relu=False,
    residual=False,
    groups=1,
    renorm=None,
    training=True,
    seed=0,
):
    """A FusedInputs for one fixed case (weight, bias and running statistics given)."""
    from strategies import Case, channel_values

    values = channel_values(np.random.default_rng(seed), shape, axis, 2.0, 1.0)
    case = Case(place(values, dtype, layout, axis), axis, seed, layout, 2.0, 1.0)
    z = like(case, case.rng(3).standard_normal(shape), layout=("channels_last", ())) if residual else None
    return FusedInputs(ForwardInputs(case, make_params(case), training, 0.37, 1e-5), relu, z, groups, renorm)


PATHS = [
    # (shape, axis, groups, reduction kernel, its block): 64 threads, 1 item each and at most 4 splits
    # per channel and group, at most 2 groups per launch.
    ((12, 2, 25), 1, 1, "stats_slab", (64, 1)),
    ((12, 2, 25), 1, 3, "stats_slab", (64, 1)),  # 100 values per channel and group: 2 splits, 2 launches
    ((8, 2, 1, 41), 1, 4, "stats_slab", (64, 1)),  # long rows
    ((600, 3), 1, 2, "stats_rows", (4, 16)),  # small C: 4 channel slots by 16 rows
    ((120, 40), -1, 3, "stats_rows", (32, 2)),  # C > 32: two tiles of 32 channels
]


@pytest.mark.parametrize(
    "shape, axis, groups, kernel, block",
    PATHS,
    ids=["slab", "slab-G3", "slab-long-rows-G4", "rows-small-C-G2", "rows-two-tiles-G3"],
)
def test_multi_block_and_multi_launch_reductions(shape, axis, groups, kernel, block, small_launches, launches):
    """Two warps per block, several blocks per channel and group, several launches for the groups."""
    small_launches.THREADS_PER_BLOCK = 64
    small_launches.ITEMS_PER_THREAD = 1
    small_launches.MAX_SPLITS = 4
    small_launches.MAX_GROUPS_PER_LAUNCH = 2
    renorm = (1.5, 0.2) if groups == 1 else None
    f = _fixed(shape, axis, relu=True, residual=True, groups=groups, renorm=renorm)
    forward_backward(f, ("contiguous", ()))
    for name in (kernel, ("backward_reduce_" + kernel.split("_")[1] + "_masked")):
        grids = [(grid, args) for launched, grid, launched_block, args in launches if launched == name]
        assert [grid[2] for grid, _ in grids] == [min(2, groups - first) for first in range(0, groups, 2)], name
        assert all(grid[1] > 1 for grid, _ in grids), (name, grids[0][0])
        assert all(b == block for launched, _, b, _ in launches if launched == name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rmax, dmax", [(1.0, 0.0), (1.05, 0.01), (3.0, 3.0)], ids=["pinned", "clipped", "free"])
def test_renorm_clipping(dtype, rmax, dmax):
    """r and d at, inside and beyond their bounds, with running statistics far from the batch's."""
    f = _fixed((16, 3, 4), 1, dtype, renorm=(rmax, dmax), seed=5)
    p = f.inp.params
    # Running stats well away from the batch's: r about 0.5 or 2, d about +-1.
    p.running_var[:] = p.running_var * np.array([4.0, 0.25, 1.0], p.running_var.dtype)
    p.running_mean[:] = p.running_mean + np.array([2.0, -2.0, 0.0], p.running_mean.dtype)
    forward_backward(f, ("strided", (0, -2)))


def test_nan_propagates_through_relu_and_blocks_the_gradient():
    """relu(NaN) is NaN (as in PyTorch, unlike max(v, 0)); in backward, y NaN or y <= 0 blocks the gradient,
    an Inf dy there included."""
    x = np.random.default_rng(1).normal(size=(6, 3, 4)).astype(np.float32)
    x[2, 1, 3] = np.nan
    y, mean, invstd, _, _ = BACKEND.forward_batch(
        dev(x), 1, np.dtype(np.float32), None, None, 1e-5, None, None, 0.1, False, relu=True
    )
    y_host = host(y)
    assert np.isnan(y_host[:, 1]).all() and (y_host[:, [0, 2]] >= 0).all() and (y_host[:, [0, 2]] == 0).any()
    dy = np.ones_like(x)
    dy[y_host == 0] = np.inf
    dx, dweight, dbias, dres = BACKEND.backward(
        dev(dy), dev(x), 1, np.dtype(np.float32), None, mean, invstd, True, y=y, dresidual=True
    )
    dres = host(dres)
    np.testing.assert_array_equal(dres, np.where(y_host > 0, dy, 0))
    np.testing.assert_array_equal(host(dbias), (y_host > 0).sum(axis=(0, 2)).astype(np.float32))
    assert np.isfinite(host(dx)[:, [0, 2]]).all() and np.isfinite(host(dweight)[[0, 2]]).all()


def test_dresidual_without_relu_is_a_copy_of_dy_in_xs_layout():
    x = np.moveaxis(np.random.default_rng(2).normal(size=(4, 5, 3)).astype(np.float32), -1, 1)  # channels-last
    dy = np.asfortranarray(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))
    _, mean, invstd, _, _ = BACKEND.forward_batch(
        dev(x), 1, np.dtype(np.float32), None, None, 1e-5, None, None, 0.1, False
    )
    dx, _, _, dres = BACKEND.backward(
        dev(dy), dev(x), 1, np.dtype(np.float32), None, mean, invstd, True, dresidual=True
    )
    np.testing.assert_array_equal(host(dres), dy)
    assert views.byte_strides(dres) == views.byte_strides(dx) == x.strides


# ------------------------------------------------------------- signatures ---
def test_every_fused_launch_has_a_signature_that_ptx_compiles(launches):
    """Every option variant is launched, each with argument types listed in fastbn.backends.cuda.plan.signatures."""
    # (relu, residual, groups, renorm, training): each of the four elementwise variants both ways,
    # ghost batches, renormalization and eval once.
    options = [
        (False, False, 1, None, True),
        (True, False, 2, None, True),
        (False, True, 1, (2.0, 1.0), True),
        (True, True, 1, None, True),
        (True, True, 1, None, False),
    ]
    for dtype in (np.float16, np.float32, np.float64):
        compiled = {(name, argtypes) for name, _, argtypes in plan.signatures(dtype)}
        for layout, unused in ((("contiguous", ()), "rows"), (("channels_last", ()), "slab")):
            del launches[:]
            for relu, residual, groups, renorm, training in options:
                f = _fixed(
                    (4, 2, 3),
                    1,
                    dtype,
                    layout,
                    relu=relu,
                    residual=residual,
                    groups=groups,
                    renorm=renorm,
                    training=training,
                )
                result = run_forward(f, *(gpu(a) for a in f.inp.running_copies()))
                run_backward(f, result, f.inp.case.x)
            for name, _, _, args in launches:
                argtypes = tuple(numba.typeof(arg) for arg in args)
                assert (name, argtypes) in compiled, (np.dtype(dtype).name, layout, name, argtypes)
            launched = {name for name, *_ in launches}
            expected = {name for name, _ in compiled if unused not in name}
            # All but moments' kernel; gather only where the residual's layout is not x's.
            expected -= {"stats_merge", "gather"}
            assert launched - {"gather"} == expected, (expected - launched, launched - expected)


def test_no_host_transfers(monkeypatch):
    """Fused forward (every option) and backward never copy between host and device."""
    cases = [
        _fixed((4, 3, 5), 1, relu=True, residual=True, groups=2),
        _fixed((4, 3, 5), 1, relu=True, residual=True, renorm=(2.0, 1.0)),
    ]
    inputs = []
    for f in cases:
        rm, rv = (gpu(a) for a in f.inp.running_copies())
        inputs.append((f, rm, rv, f.inp.case.x))
    forbid_transfers(monkeypatch)
    results = []
    for f, rm, rv, dy in inputs:
        result = run_forward(f, rm, rv)
        results.append((result, run_backward(f, result, dy)))
    monkeypatch.undo()
    assert all(np.isfinite(host(result[0])).all() for result, _ in results)


@pytest.mark.parametrize("options", [dict(virtual_batch_size=2), dict(renorm=(1.2, 0.1))], ids=["ghost", "renorm"])
def test_gpu_matches_the_cpu_backend(options):
    """The same public call on host and on GPU arrays: equal results, Saved of the same shapes."""
    rng = np.random.default_rng(4)
    x = np.moveaxis(rng.normal(1.0, 2.0, (8, 5, 3)).astype(np.float32), -1, 1)  # channels-last
    z = rng.normal(size=(8, 3, 5)).astype(np.float32)
    dy = rng.normal(size=(8, 3, 5)).astype(np.float32)
    w, b = rng.uniform(0.5, 2.0, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    results = []
    for to in (lambda a: a, gpu):
        rm, rv = to(np.array([0.5, 1.0, 1.5], np.float32)), to(np.array([2.0, 3.0, 5.0], np.float32))
        y, saved = fastbn.forward(
            to(x), to(w), to(b), running_mean=rm, running_var=rv, activation="relu", residual=to(z), **options
        )
        grads = fastbn.backward(to(dy), to(x), to(w), saved, y=y)
        arrays = [rm, rv, y, saved.mean, saved.invstd, *grads] + ([saved.r, saved.d] if "renorm" in options else [])
        results.append([a if isinstance(a, np.ndarray) else host(a) for a in arrays])
    for cpu, gpu_result in zip(*results):
        assert cpu.shape == gpu_result.shape and cpu.dtype == gpu_result.dtype
        np.testing.assert_allclose(gpu_result, cpu, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- fold ---
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "dense_no_bias"])
def test_fold_on_gpu_arrays_matches_the_cpu(kind, dtype):
    """fold on GPU arrays returns GPU arrays with the CPU backend's values (float32 compute on the GPU
    for float16/float32 layers: within the float32 tolerance of the statistics)."""
    rng = np.random.default_rng(11)
    shape, axis = {"conv": ((4, 3, 2, 2), 0), "conv_transpose": ((3, 4, 2, 2), 1), "dense_no_bias": ((4, 5), 0)}[kind]
    channels = shape[axis]
    sd = np.float64 if dtype == np.float64 else np.float32
    lw = rng.standard_normal(shape).astype(dtype)
    lb = None if kind == "dense_no_bias" else rng.standard_normal(channels).astype(dtype)
    rm, rv = rng.standard_normal(channels).astype(sd), rng.uniform(0.5, 2, channels).astype(sd)
    w, b = rng.uniform(-2, 2, channels).astype(sd), rng.standard_normal(channels).astype(sd)
    fw, fb = fastbn.fold(gpu(lw), gpu(lb), gpu(rm), gpu(rv), gpu(w), gpu(b), 1e-3, axis=axis)
    ew, eb = fastbn.fold(lw, lb, rm, rv, w, b, 1e-3, axis=axis)
    assert host(fw).shape == lw.shape and host(fw).dtype == dtype and host(fb).shape == (channels,)
    tol = output_tol(dtype)
    assert_close(host(fw), ew, tol, scale=np.abs(ew.astype(np.float64)), what="folded weight")
    scale = np.abs(eb.astype(np.float64)) + np.abs(rm) * np.abs(w) / np.sqrt(rv + 1e-3) + 1
    assert_close(host(fb), eb, tol, scale=scale, what="folded bias")
