"""Numerics: no cancellation when |mean| >> std, no float16 overflow, and NaN/Inf that stay in
their own channel (as in PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn

from oracle import oracle_backward, oracle_forward, oracle_moments, reduce_axes
from strategies import (
    BFLOAT16,
    NUMERICS_VAR_RTOL,
    Tol,
    assert_close,
    assert_within,
    backward_scales,
    invstd_scale,
    mean_scale,
    output_tol,
    stats_dtype,
    stats_tol,
    unit_roundoff,
    y_scale,
)

# The layouts of the brief: NCHW (axis 1), channels-last (N, H, W, C) with axis -1, and (N, C).
LAYOUT_SHAPES = {
    "NCHW": ((64, 8, 32, 32), 1),
    "NHWC": ((64, 32, 32, 8), -1),
    "NC": ((16384, 8), 1),
}
# Mean far above the spread: E[x^2] - E[x]^2 loses every digit of the variance here
# (float32: 1e8 vs 1 with 7 digits; float64: 1e16 vs 1 with 16 digits).
OFFSETS = {np.float32: 1e4, np.float64: 1e8}
EPS = 1e-5


def _offset_data(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return (OFFSETS[dtype] + rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUT_SHAPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_variance_does_not_cancel(dtype, layout):
    shape, axis = LAYOUT_SHAPES[layout]
    x = _offset_data(dtype, shape)
    e_mean, e_var = oracle_moments(x, axis)
    var_tol = Tol(rtol=NUMERICS_VAR_RTOL, atol=0.0)
    sd = stats_dtype(dtype)

    mean, var = fastbn.moments(x, axis=axis)
    assert mean.dtype == sd and var.dtype == sd
    assert_close(var, e_var, var_tol, what=f"moments var, {layout} {np.dtype(dtype).name}")
    assert_close(mean, e_mean, stats_tol(dtype), scale=mean_scale(x, e_mean, axis), what="moments mean")

    rm, rv = np.zeros(shape[axis], sd), np.ones(shape[axis], sd)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, momentum=1.0, eps=EPS, axis=axis)
    invstd = saved.invstd.astype(np.float64)
    assert_close(1.0 / invstd**2 - EPS, e_var, var_tol, what="variance from saved.invstd")
    n = x.size // shape[axis]
    assert_close(rv, e_var * n / (n - 1), var_tol, what="running_var (momentum 1)")

    # the output is standardised: per-channel std 1 (to the variance's precision) and mean 0
    # up to rounding the saved mean to the stats dtype (half an ulp of |mean| over the spread)
    axes = reduce_axes(x.ndim, axis)
    y64 = y.astype(np.float64)
    std_expected = np.sqrt(e_var / (e_var + EPS))
    assert_within(y64.std(axis=axes), std_expected, NUMERICS_VAR_RTOL * std_expected, "std of y")
    allowed_mean = 2 * unit_roundoff(sd) * np.abs(e_mean) * invstd + 1e-5
    assert_within(y64.mean(axis=axes), np.zeros(shape[axis]), allowed_mean, "mean of y")


HALF_SHAPES = {
    "NCHW": ((32, 4, 16, 16), 1),
    "NHWC": ((32, 16, 16, 4), -1),
    "NC": ((8192, 4), 1),
}


@pytest.mark.parametrize("layout", sorted(HALF_SHAPES))
def test_float16_near_max_does_not_overflow(layout):
    """Values near 6e4 (half's max is 65504): sums of squares or of values overflow half,
    so statistics must be accumulated wider and come back finite and right."""
    shape, axis = HALF_SHAPES[layout]
    rng = np.random.default_rng(1)
    x = np.minimum(6e4 + rng.normal(0.0, 100.0, shape), 65504.0).astype(np.float16)
    assert np.isfinite(x).all()
    e_mean, e_var = oracle_moments(x, axis)
    tol = stats_tol(np.float16)  # float32 statistics

    mean, var = fastbn.moments(x, axis=axis)
    assert np.isfinite(mean).all() and np.isfinite(var).all()
    assert_close(mean, e_mean, tol, scale=mean_scale(x, e_mean, axis), what="float16 moments mean")
    assert_close(var, e_var, Tol(rtol=NUMERICS_VAR_RTOL, atol=0.0), what="float16 moments var")

    C = shape[axis]
    weight = np.linspace(0.5, 2.0, C).astype(np.float32)
    bias = np.linspace(-1.0, 1.0, C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, saved = fastbn.forward(x, weight, bias, running_mean=rm, running_var=rv, axis=axis)
    o = oracle_forward(x, weight, bias, running_mean=np.zeros(C), running_var=np.ones(C), axis=axis)
    assert np.isfinite(y).all() and np.isfinite(saved.invstd).all()
    assert np.isfinite(rm).all() and np.isfinite(rv).all()
    assert_close(y, o.y, output_tol(np.float16), scale=y_scale(x, o.mean, o.invstd, weight, bias, axis, tol), what="y")
    assert_close(saved.invstd, o.invstd, tol, scale=invstd_scale(x, o.mean, o.invstd, axis, tol), what="invstd")
    assert_close(rv, o.running_var, Tol(rtol=NUMERICS_VAR_RTOL, atol=0.0), what="float16 running_var")

    dy = rng.standard_normal(shape).astype(np.float16)
    dx, dweight, dbias = fastbn.backward(dy, x, weight, saved, axis=axis)
    e_dx, e_dweight, e_dbias = oracle_backward(dy, x, weight, o.mean, o.invstd, True, axis)
    assert np.isfinite(dx).all() and np.isfinite(dweight).all() and np.isfinite(dbias).all()
    dx_scale, dw_scale, db_scale = backward_scales(x, dy, o.mean, o.invstd, weight, axis, tol)
    assert_close(dx, e_dx, output_tol(np.float16), scale=dx_scale, what="float16 dx")
    assert_close(dweight, e_dweight, tol, scale=dw_scale, what="float16 dweight")
    assert_close(dbias, e_dbias, tol, scale=db_scale, what="float16 dbias")


# --------------------------------------------------------------------------- NaN / Inf
# Shapes chosen so that both kernel patterns run, the channels-last one over several blocks
# of rows (a NaN in one block must not leak through the merge into other channels).
NONFINITE_SHAPES = {
    "NCHW": ((4, 5, 6, 7), 1),
    "NHWC": ((8, 16, 16, 5), -1),
    "NC-long": ((20000, 5), 1),
    "strided": ((6, 5, 9), -2),
}
NAN_CHANNEL, INF_CHANNEL, BOTH_INF_CHANNEL = 1, 3, 4


def _nonfinite_input(dtype, layout):
    shape, axis = NONFINITE_SHAPES[layout]
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, shape)
    if layout == "strided":  # a non-contiguous view (every other element of a bigger array)
        big = np.full((shape[0], shape[1], 2 * shape[2]), np.nan)
        big[:, :, ::2] = x
        x = big.astype(dtype)[:, :, ::2]
    else:
        x = x.astype(dtype)
    moved = np.moveaxis(x, axis, 0)  # a view: writes go to x
    count = moved[0].size
    positions = rng.choice(count, size=2, replace=False)
    moved[NAN_CHANNEL].flat[positions[0]] = np.nan
    moved[INF_CHANNEL].flat[positions[1]] = np.inf
    moved[BOTH_INF_CHANNEL].flat[positions[0]] = np.inf
    moved[BOTH_INF_CHANNEL].flat[positions[1]] = -np.inf
    return x, axis


def _finite_channels(C):
    return np.array([c not in (NAN_CHANNEL, INF_CHANNEL, BOTH_INF_CHANNEL) for c in range(C)])


# the oracle and the tolerance helpers compute on NaN/Inf on purpose
_ORACLE_ON_NONFINITE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@_ORACLE_ON_NONFINITE
@pytest.mark.parametrize("layout", sorted(NONFINITE_SHAPES))
@pytest.mark.parametrize(
    "dtype", [np.float16, BFLOAT16, np.float32, np.float64], ids=["float16", "bfloat16", "float32", "float64"]
)
def test_nan_and_inf_stay_in_their_channel_in_training(dtype, layout):
    x, axis = _nonfinite_input(dtype, layout)
    C = x.shape[axis]
    finite = _finite_channels(C)
    bad = ~finite
    sd = stats_dtype(dtype)
    tol = stats_tol(dtype)

    mean, var = fastbn.moments(x, axis=axis)
    assert np.isnan(mean[NAN_CHANNEL]) and np.isnan(mean[BOTH_INF_CHANNEL]) and not np.isfinite(mean[INF_CHANNEL])
    assert np.isnan(var[bad]).all(), var  # as PyTorch: inf - inf
    e_mean, e_var = oracle_moments(x, axis)
    assert np.isfinite(mean[finite]).all() and np.isfinite(var[finite]).all()

    weight = np.linspace(0.5, 1.5, C).astype(sd)
    bias = np.linspace(-1.0, 1.0, C).astype(sd)
    rng = np.random.default_rng(3)
    rm0, rv0 = rng.normal(size=C).astype(sd), rng.uniform(0.5, 2.0, C).astype(sd)
    rm, rv = rm0.copy(), rv0.copy()
    y, saved = fastbn.forward(x, weight, bias, running_mean=rm, running_var=rv, axis=axis)
    o = oracle_forward(x, weight, bias, running_mean=rm0, running_var=rv0, axis=axis)

    y_by_channel = np.moveaxis(y, axis, 0)
    assert np.isnan(y_by_channel[bad]).all(), "a channel holding NaN or Inf must come out all NaN"
    assert np.isnan(saved.invstd[bad]).all()
    assert np.isnan(rv[bad]).all() and not np.isfinite(rm[bad]).any()
    # every other channel exactly as without the bad values
    assert np.isfinite(y_by_channel[finite]).all()
    assert_close(
        np.moveaxis(y, axis, 0)[finite],
        np.moveaxis(o.y, axis, 0)[finite],
        output_tol(dtype),
        scale=np.moveaxis(y_scale(x, o.mean, o.invstd, weight, bias, axis, tol), axis, 0)[finite],
        what="y of the finite channels",
    )
    assert_close(saved.mean[finite], e_mean[finite], tol, scale=mean_scale(x, e_mean, axis)[finite], what="mean")
    assert_close(rm[finite], o.running_mean[finite], tol, scale=np.abs(rm0[finite]) + 1, what="running_mean")
    assert_close(rv[finite], o.running_var[finite], tol, scale=np.abs(rv0[finite]) + 1, what="running_var")
    assert_close(var[finite], e_var[finite], tol, scale=e_var[finite] + 1, what="moments var")

    # backward: dx and dweight NaN in the bad channels only; dbias = sum(dy) is finite everywhere
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dweight, dbias = fastbn.backward(dy, x, weight, saved, axis=axis)
    e_dx, e_dweight, e_dbias = oracle_backward(dy, x, weight, o.mean, o.invstd, True, axis)
    dx_by_channel = np.moveaxis(dx, axis, 0)
    assert np.isnan(dx_by_channel[bad]).all() and np.isnan(dweight[bad]).all()
    assert np.isfinite(dx_by_channel[finite]).all() and np.isfinite(dweight[finite]).all()
    dx_scale, dw_scale, db_scale = backward_scales(x, dy, o.mean, o.invstd, weight, axis, tol)
    assert_close(
        dx_by_channel[finite],
        np.moveaxis(e_dx, axis, 0)[finite],
        output_tol(dtype),
        scale=np.moveaxis(dx_scale, axis, 0)[finite],
        what="dx of the finite channels",
    )
    assert_close(dweight[finite], e_dweight[finite], tol, scale=dw_scale[finite], what="dweight")
    assert_close(dbias, e_dbias, tol, scale=db_scale, what="dbias (finite in every channel)")


@_ORACLE_ON_NONFINITE
@pytest.mark.parametrize("layout", sorted(NONFINITE_SHAPES))
@pytest.mark.parametrize(
    "dtype", [np.float16, BFLOAT16, np.float32, np.float64], ids=["float16", "bfloat16", "float32", "float64"]
)
def test_nan_and_inf_stay_in_their_element_in_eval(dtype, layout):
    """In eval mode the normalisation is elementwise: only the NaN/Inf elements themselves
    are non-finite (NaN stays NaN, +-Inf stays infinite), the rest is exact."""
    x, axis = _nonfinite_input(dtype, layout)
    C = x.shape[axis]
    sd = stats_dtype(dtype)
    rng = np.random.default_rng(4)
    weight = rng.uniform(0.5, 1.5, C).astype(sd)
    bias = rng.normal(size=C).astype(sd)
    rm0, rv0 = rng.normal(3.0, 1.0, C).astype(sd), rng.uniform(2.0, 6.0, C).astype(sd)
    rm, rv = rm0.copy(), rv0.copy()
    y, saved = fastbn.forward(x, weight, bias, running_mean=rm, running_var=rv, training=False, axis=axis)
    o = oracle_forward(x, weight, bias, running_mean=rm0, running_var=rv0, training=False, axis=axis)
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
    assert np.array_equal(np.isnan(y), np.isnan(x)) and np.array_equal(np.isinf(y), np.isinf(x))
    finite = np.isfinite(x)
    tol = stats_tol(dtype)
    scale = y_scale(np.where(finite, x, 0), o.mean, o.invstd, weight, bias, axis, tol)
    assert_close(y[finite], o.y[finite], output_tol(dtype), scale=scale[finite], what="y away from NaN/Inf")
    assert_close(saved.invstd, o.invstd, tol, what="eval invstd from running_var")


def test_merging_into_an_empty_summary_cannot_overflow():
    """Chan's merge into an empty summary takes the piece as it is: delta**2 * 0 would overflow to NaN for
    means beyond 1e154, where the merged variance is finite (here through the synchronised path's merge,
    an empty process first)."""
    from fastbn._sync import merge_moments

    rows = np.array([[0, 0.0, 0.0], [4, 1e200, 0.0], [2, 1e200, 0.0]])
    count, mean, var = merge_moments(rows, 1)
    assert count == 6 and mean[0] == 1e200 and var[0] == 0.0


# --------------------------------------------------------------------------- extreme magnitudes
# Shapes and plans: SLAB fused and streamed (several pieces: runs of 300 > MIN_PIECE), and ROWS
# over several blocks of rows; element counts that are not powers of two, so that a mean computed
# as sum / n is inexact.
EXTREME_CASES = [
    ((5, 3, 300), 1, {"strategy": "fused"}),
    ((5, 3, 300), 1, {"strategy": "streamed"}),
    ((6001, 3), 1, None),
]
EXTREME_IDS = ["slab-fused", "slab-streamed", "rows"]


@pytest.mark.parametrize("shape, axis, plan", EXTREME_CASES, ids=EXTREME_IDS)
@pytest.mark.parametrize(
    "dtype, value",
    [(np.float64, 1e200), (np.float64, -1.7e308), (np.float32, 3e38), (np.float64, 1e-300)],
    ids=["f64-1e200", "f64-near-max", "f32-near-max", "f64-tiny"],
)
def test_a_constant_channel_of_any_magnitude_has_variance_zero(shape, axis, plan, dtype, value):
    """Statistics on x minus a per-channel pivot: a constant channel gets variance exactly 0 and its
    value as the mean.  Without the pivot a float64 channel of 1e200s gave inf: its float64 mean is
    off by an ulp (about 1e184), which squared overflows."""
    x = np.full(shape, value, dtype)
    moved = np.moveaxis(x, axis, 0)  # a view: channel first
    moved[1] = np.random.default_rng(4).standard_normal(moved[1].shape)  # ordinary values beside them
    mean, var = fastbn.moments(x, axis=axis, _plan=plan)
    constant = [0, 2]
    assert (var[constant] == 0).all() and (mean[constant] == dtype(value)).all(), (mean, var)
    running_mean, running_var = np.zeros(3, dtype), np.ones(3, dtype)
    weight, bias = np.full(3, 2.0, dtype), np.full(3, 0.5, dtype)
    y, _saved = fastbn.forward(
        x, weight, bias, running_mean=running_mean, running_var=running_var, axis=axis, _plan=plan
    )
    y_by_channel = np.moveaxis(y, axis, 0)
    assert (y_by_channel[constant] == dtype(0.5)).all()
    assert np.isfinite(running_var).all() and (running_var[constant] == dtype(0.9)).all()


def _exact_moments(values):
    """Mean and biased variance of float64 values in exact rational arithmetic, rounded once."""
    from fractions import Fraction

    exact = [Fraction(v) for v in values.ravel().tolist()]
    mean = sum(exact) / len(exact)
    var = sum((v - mean) ** 2 for v in exact) / len(exact)
    return float(mean), float(var) if var < Fraction(np.finfo(np.float64).max) else np.inf


@pytest.mark.parametrize("shape, axis, plan", EXTREME_CASES, ids=EXTREME_IDS)
@pytest.mark.parametrize(
    "low, high", [(0.0, 1e154), (-3e153, 2e153), (1e300, -1e300)], ids=["0..1e154", "-3e153..2e153", "+-1e300"]
)
def test_squared_deviations_that_overflow_float64_give_the_finite_variance(shape, axis, plan, low, high):
    """Half the elements low, half high: the variance ((high - low) / 2)^2 is finite for the first two
    pairs, though every piece's sum of squared deviations overflows float64 (those channels are
    computed again, scaled by 2^-600); for the last the true variance is beyond float64 (inf is right)
    and the mean is 0, which the pivoted sums (1e300 - (-1e300) overflows) must not turn into inf."""
    x = np.empty(shape)
    moved = np.moveaxis(x, axis, -1)  # channel last: moved[..., c]
    flat = moved.reshape(-1, 3)
    flat[0::2] = low
    flat[1::2] = high
    x = np.ascontiguousarray(np.moveaxis(flat.reshape(moved.shape), -1, axis))
    mean, var = fastbn.moments(x, axis=axis, _plan=plan)
    e_mean, e_var = _exact_moments(np.moveaxis(x, axis, 0)[0])
    assert np.isfinite(mean).all()
    np.testing.assert_allclose(mean, e_mean, rtol=1e-12, atol=1e-12 * abs(high - low))
    if np.isfinite(e_var):
        np.testing.assert_allclose(var, e_var, rtol=1e-12)
    else:
        assert (var == np.inf).all()
    # The running update: 0.9 * 1 + 0.1 * var * n / (n - 1) is finite though n * var is not (with
    # fast-math, LLVM had reassociated var * (n / (n - 1)) into (var * n) / (n - 1): inf).
    n = x.size // 3
    running_mean, running_var = np.zeros(3), np.ones(3)
    fastbn.forward(x, running_mean=running_mean, running_var=running_var, axis=axis, _plan=plan)
    np.testing.assert_allclose(running_mean, 0.1 * e_mean, rtol=1e-12, atol=1e-13 * abs(high - low))
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * e_var * (n / (n - 1)), rtol=1e-12)


@pytest.mark.parametrize("shape, axis, plan", EXTREME_CASES, ids=EXTREME_IDS)
def test_an_infinity_makes_its_channel_mean_infinite_as_in_torch(shape, axis, plan):
    """+inf among finite values: the mean is +inf (torch's sum / n), not the NaN that Chan's merge's
    inf - inf gave; the running mean follows, as torch's does; the variance is NaN in both."""
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(x, axis, 0)
    moved[0].flat[7] = np.inf
    moved[2].flat[-1] = -np.inf
    mean, var = fastbn.moments(x, axis=axis, _plan=plan)
    assert mean[0] == np.inf and mean[2] == -np.inf and np.isfinite(mean[1])
    assert np.isnan(var[[0, 2]]).all() and np.isfinite(var[1])
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.forward(x, running_mean=running_mean, running_var=running_var, axis=axis, _plan=plan)
    torch = pytest.importorskip("torch")
    t_mean, t_var = torch.zeros(3), torch.ones(3)
    t_x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1)))
    torch.nn.functional.batch_norm(t_x, t_mean, t_var, training=True)
    np.testing.assert_array_equal(np.isnan(running_var), np.isnan(t_var.numpy()))
    assert running_mean[0] == t_mean[0] == np.inf and running_mean[2] == t_mean[2] == -np.inf


def test_the_synchronised_merge_cannot_overflow_where_the_variance_is_finite():
    """Processes' summaries are merged as variances, not as sums of squares: 4000 elements per process
    of variance 1e306 have M2 = 4e309, beyond float64, though the merged variance is about 1e306."""
    from fastbn._sync import merge_moments

    rows = np.array([[4000, 1e152, 1e306], [0, 0.0, 0.0], [2000, -1e152, 1e306]])
    count, mean, var = merge_moments(rows, 1)
    exact_mean = (4000 * 1e152 - 2000 * 1e152) / 6000
    exact_var = 1e306 + (4000 * (1e152 - exact_mean) ** 2 + 2000 * (-1e152 - exact_mean) ** 2) / 6000
    assert count == 6000
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-14)
    np.testing.assert_allclose(var, exact_var, rtol=1e-14)
    rows = np.array([[3, np.inf, np.nan], [5, 1.0, 0.5]])
    assert merge_moments(rows, 1)[1][0] == np.inf


@pytest.mark.parametrize(
    "shape, axis",
    [((64, 8, 32, 32), 1), ((64, 32, 32, 8), -1), ((3, 4, 5000), 1), ((37, 3000), 1)],
    ids=["NCHW", "NHWC", "NCL-long-runs", "NC-wide-rows"],
)
def test_float64_statistics_within_the_derived_bound(shape, axis):
    """The bound derived in fastbn/backends/cpu/reductions.py ("error bound"), checked against
    80-bit long double sums: |var - exact| <= (s + 3 P + 2) u var + (s u R)^2 and |mean - exact| <=
    (s + 3 P + 2) u R + u |mean|, s at most 16384 elements per piece or block (BLOCK_ELEMENTS, the
    larger of the two), P pieces or blocks, R the distance from the pivot (x[0]) to the farthest
    element, on data whose mean (1e8) is far above its spread (1)."""
    from fastbn.backends.cpu.plan import BLOCK_ELEMENTS, MAX_PIECE

    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("no extended-precision long double on this platform")
    x = np.random.default_rng(11).standard_normal(shape) + 1e8
    mean, var = fastbn.moments(x, axis=axis)
    by_channel = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    wide = by_channel.astype(np.longdouble)
    e_mean = wide.mean(axis=1)
    e_var = ((wide - e_mean[:, None]) ** 2).mean(axis=1)
    u = 2.0**-53
    n = by_channel.shape[1]
    s = max(MAX_PIECE, BLOCK_ELEMENTS)
    pieces = n  # at most one piece per element: a loose P
    R = np.abs(by_channel - by_channel[:, :1]).max(axis=1)
    var_bound = (s + 3 * pieces + 2) * u * e_var.astype(np.float64) + (s * u * R) ** 2
    mean_bound = (s + 3 * pieces + 2) * u * R + u * np.abs(e_mean.astype(np.float64))
    assert (np.abs(var - e_var.astype(np.float64)) <= var_bound).all()
    assert (np.abs(mean - e_mean.astype(np.float64)) <= mean_bound).all()
    # and far inside it in practice: float64 sums of 1e5 elements, relative error near 1e-13 at most
    assert (np.abs(var - e_var.astype(np.float64)) <= 1e-10 * e_var.astype(np.float64)).all()


@pytest.mark.parametrize(
    "shape, axis",
    [((64, 8, 32, 32), 1), ((64, 32, 32, 8), -1), ((16384, 8), 1), ((3, 4, 5000), 1), ((24, 3, 7), 1), ((37, 3000), 1)],
    ids=["NCHW", "NHWC", "NC", "NCL-long-runs", "short-runs", "NC-wide-rows"],
)
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 100.0, -3000.0])
def test_half_statistics_within_the_derived_bound(shape, axis, half, offset):
    """The float32-block bound of float16 and bfloat16 statistics, derived in
    fastbn/backends/cpu/reductions.py ("error bound"): |var - exact| <= (3 B + 2) u var
    + 2 u sqrt(var (var + (mean - K)^2)) + (3 P + 2) u64 var + 8 (B + 1)^2 u^2 (var + R^2),
    and |mean - exact| <= B u sqrt(var) + u sqrt(var + (mean - K)^2) + 8 (B + 1)^2 u^2 R, with
    u = 2^-24, B = LANE_BLOCK, K the pivot (the channel's first element), R the distance from
    K to the farthest element, plus the rounding of the float32 results (u of each).  The
    exact statistics are float64 sums of the half values (exact to ~1e-12 here)."""
    from fastbn.backends.cpu.plan import LANE_BLOCK

    dtype = np.float16 if half == "float16" else _bfloat16()
    rng = np.random.default_rng(5)
    # a spread of 1 around the offset, and one channel with a tiny spread (1/64) around it
    x64 = offset + rng.standard_normal(shape)
    x64[(slice(None),) * (axis % len(shape)) + (0,)] *= 1 / 64
    x = x64.astype(dtype)
    mean, var = fastbn.moments(x, axis=axis)
    assert mean.dtype == np.float32 and var.dtype == np.float32
    by_channel = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    e_mean = by_channel.mean(axis=1)
    e_var = ((by_channel - e_mean[:, None]) ** 2).mean(axis=1)
    u, u64, B = 2.0**-24, 2.0**-53, LANE_BLOCK
    n = by_channel.shape[1]
    K = by_channel[:, 0]
    R = np.abs(by_channel - K[:, None]).max(axis=1)
    second = 8 * (B + 1) ** 2 * u**2
    var_bound = (
        (3 * B + 2) * u * e_var
        + 2 * u * np.sqrt(e_var * (e_var + (e_mean - K) ** 2))
        + (3 * n + 2) * u64 * e_var
        + second * (e_var + R**2)
        + u * e_var  # the float32 result's rounding
    )
    mean_bound = B * u * np.sqrt(e_var) + u * np.sqrt(e_var + (e_mean - K) ** 2) + second * R + u * np.abs(e_mean)
    assert (np.abs(var.astype(np.float64) - e_var) <= var_bound).all()
    assert (np.abs(mean.astype(np.float64) - e_mean) <= mean_bound).all()
    # and far inside it: the variance within 1e-5 (the bar float32 input is held to)
    assert (np.abs(var.astype(np.float64) - e_var) <= 1e-5 * e_var).all()


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((64, 8, 32, 32), 1),
        ((3, 4, 5000), 1),
        ((16, 4, 50), 1),
        ((24, 3, 7), 1),
        ((2, 3, 4099), 1),
        ((64, 32, 32, 8), -1),
        ((16385, 3), 1),
        ((37, 5), 1),
        ((37, 3000), 1),
    ],
    ids=[
        "NCHW-whole-blocks",
        "NCL-long-runs",
        "partial-blocks",
        "short-runs",
        "one-past-a-piece",
        "NHWC",
        "NC-blocks-of-rows",
        "NC-odd-rows",
        "NC-wide-rows",  # blocks of MIN_STATS_ROWS rows, the last one partial
    ],
)
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e5])
def test_float32_lane_statistics_within_the_derived_bound(shape, axis, offset):
    """The float32-lane bounds of float32 statistics, derived in fastbn/backends/cpu/reductions.py
    ("error bound", float32): SLAB |var - exact| <= (26 u + 16 u^2 (|mean| + 8 R) / sd + (3 P + 2) u64) var
    + 2^-149 and |mean - exact| <= 8 u sd + 2 u64 |mean|; ROWS the same with 29 u, 18 u^2 (|mean| + 9 R)
    and 9 u sd; u = 2^-24, R the distance from the pivot (the channel's first element) to the farthest
    element, plus the rounding of the float32 results (u of each).  Means of 1e4 and 3e5 times the spread,
    one channel 64 times narrower and one whose pivot is an outlier 40 spreads away; runs that fill whole
    blocks of 128, leave partial blocks and tails, or have no whole vector at all; rows in whole and partial
    sub-blocks of 16.  And the issue's bar: the variance within 1e-5 of the exact one."""
    rng = np.random.default_rng(7)
    x64 = offset + rng.standard_normal(shape)
    channel = (slice(None),) * (axis % len(shape))
    narrow = (*channel, 0)  # channel 0, 64 times narrower
    x64[narrow] = offset + (x64[narrow] - offset) / 64
    first = [0] * len(shape)
    first[axis % len(shape)] = 1
    x64[tuple(first)] = offset + 40.0  # channel 1's pivot is an outlier
    x = x64.astype(np.float32)
    mean, var = fastbn.moments(x, axis=axis)
    assert mean.dtype == np.float32 and var.dtype == np.float32
    by_channel = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    e_mean = by_channel.mean(axis=1)
    e_var = ((by_channel - e_mean[:, None]) ** 2).mean(axis=1)
    sd = np.sqrt(e_var)
    u, u64 = 2.0**-24, 2.0**-53
    n = by_channel.shape[1]
    R = np.abs(by_channel - by_channel[:, :1]).max(axis=1)
    rows = axis % len(shape) == len(shape) - 1
    first, second, reach, spread = (29, 18, 9, 9) if rows else (26, 16, 8, 8)
    var_bound = (first * u + second * u**2 * (np.abs(e_mean) + reach * R) / sd + (3 * n + 2) * u64) * e_var
    var_bound += 2.0**-149 + u * e_var  # float32's subnormal squares, and the float32 result's rounding
    mean_bound = spread * u * sd + 2 * u64 * np.abs(e_mean) + u * np.abs(e_mean)
    assert (np.abs(var.astype(np.float64) - e_var) <= var_bound).all()
    assert (np.abs(mean.astype(np.float64) - e_mean) <= mean_bound).all()
    assert (np.abs(var.astype(np.float64) - e_var) <= 1e-5 * e_var).all()


# (37, 3000): ROWS, whose float32 gradient sums are float64 ones (far inside the bound), in chunks of at
# least MIN_STATS_ROWS rows.
@pytest.mark.parametrize("shape", [(16, 4, 50), (8, 3, 1000), (24, 3, 7), (64, 8, 16, 16), (37, 3000)])
@pytest.mark.parametrize("relu", [False, True])
def test_float32_lane_gradient_sums_within_the_derived_bound(shape, relu):
    """The float32-lane bound of the SLAB gradient sums, derived in fastbn/backends/cpu/reductions.py ("error
    bound", gradient sums): |sum_g - exact| <= 7 u sum|g| and |dotp - exact| <= 9 u sum|x - m32||g| (u =
    2^-24, m32 the saved float32 mean), read through dbias = sum_g and dweight = dotp * invstd, plus their
    float32 rounding; with and without the ReLU's mask, on a mean of 100 times the spread."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal(shape) + 100.0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, saved = fastbn.forward(x, activation="relu" if relu else None)
    _dx, dweight, dbias = fastbn.backward(dy, x, None, saved, y=y if relu else None)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    g = dy.astype(np.float64) * (y > 0) if relu else dy.astype(np.float64)
    centred = x.astype(np.float64) - np.asarray(saved.mean, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    invstd = np.asarray(saved.invstd, np.float64)
    u, u64 = 2.0**-24, 2.0**-53
    n = x.size // x.shape[1]
    e_dbias = g.sum(axis=axes)
    e_dotp = (centred * g).sum(axis=axes)
    dbias_bound = (7 * u + (n / 128 + 4) * u64) * np.abs(g).sum(axis=axes) + u * np.abs(e_dbias)
    dotp_bound = (9 * u + (n / 128 + 4) * u64) * np.abs(centred * g).sum(axis=axes)
    assert (np.abs(dbias - e_dbias) <= dbias_bound).all()
    assert (np.abs(dweight - e_dotp * invstd) <= dotp_bound * invstd + 2 * u * np.abs(e_dotp * invstd)).all()


def test_float32_lane_sums_are_in_the_fixed_order():
    """lanes.lane_sums_sq's order, replayed in NumPy float32: 16 lanes, trees of 8 terms per block of 128,
    the partial block's vectors added one by one, float64 lane totals summed in a fixed tree.  The same
    bits, so no compiler flag reorders the sums (their bound assumes this order)."""
    from numba import njit

    from fastbn.backends.cpu.lanes import lane_sums_sq

    lanes = njit(lambda v, c: lane_sums_sq(v, c))
    f32 = np.float32
    for n in (0, 15, 16, 128, 300, 1030):
        v = np.random.default_rng(n).standard_normal(n).astype(f32) * f32(100) + f32(3)
        centre = f32(2.5)
        d = (v[: n // 16 * 16] - centre).reshape(-1, 16)  # float32, one row per vector
        blocks = len(d) // 8
        wide = np.zeros((2, 16))
        for b in range(blocks):
            for k, terms in enumerate((d[8 * b : 8 * b + 8], d[8 * b : 8 * b + 8] * d[8 * b : 8 * b + 8])):
                t = list(terms)
                while len(t) > 1:
                    t = [t[i] + t[i + 1] for i in range(0, len(t), 2)]
                wide[k] += t[0].astype(np.float64)
        partial = np.zeros((2, 16), f32)
        for row in d[8 * blocks :]:
            partial[0] += row
            partial[1] += row * row
        wide += partial.astype(np.float64)
        want = []
        for k in range(2):
            lanes8 = wide[k, :8] + wide[k, 8:]
            t = list(lanes8)
            while len(t) > 1:
                t = [t[i] + t[i + 1] for i in range(0, len(t), 2)]
            want.append(t[0])
        assert lanes(v, centre) == tuple(want), n


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((6, 3), 1), ((4, 3, 5), 1), ((64, 3, 40), 1)])
def test_a_constant_channel_with_the_smallest_eps_gives_zero_not_nan(dtype, shape, axis):
    """1 / sqrt(eps) of a constant channel (variance 0) must be a number of the statistics dtype: with float32
    statistics an eps below fastbn._options.MIN_EPS_FLOAT32 gave invstd = inf and y = 0 * inf = NaN (in forward,
    normalize, the layer and backward), where y is 0.  Such an eps is refused by name (torch returns the NaN);
    from that bound up, and for float64 any positive eps, the channel is 0 and its gradients finite."""
    from fastbn._options import MIN_EPS_FLOAT32

    x = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    index = [slice(None)] * x.ndim
    index[axis] = 0
    x[tuple(index)] = 3.0
    if dtype != np.float64:
        for call in (
            lambda: fastbn.forward(x, axis=axis, eps=1e-80),
            lambda: fastbn.normalize(x, *fastbn.moments(x, axis), axis=axis, eps=1e-80),
            lambda: fastbn.BatchNorm(shape[axis], axis=axis, eps=1e-80)(x),
        ):
            with pytest.raises(ValueError, match=r"^eps: expected at least 8.7e-78 with float32 statistics"):
                call()
    eps = MIN_EPS_FLOAT32 if dtype != np.float64 else 5e-324
    y, saved = fastbn.forward(x, axis=axis, eps=eps)
    assert np.isfinite(saved.invstd).all() and (y[tuple(index)] == 0).all()
    assert (fastbn.normalize(x, *fastbn.moments(x, axis), axis=axis, eps=eps)[tuple(index)] == 0).all()
    dx, dweight, dbias = fastbn.backward(np.ones_like(x), x, np.ones(shape[axis], saved.mean.dtype), saved)
    assert np.isfinite(dx.astype(np.float64)).all() and np.isfinite(dweight).all() and np.isfinite(dbias).all()


@pytest.mark.parametrize("path", ["small", "full", "mask", "layer", "torch"])
def test_a_running_variance_update_whose_unbiased_variance_alone_overflows_is_finite(path):
    """Two values of +-1e154: the biased variance 1e308 is finite, the unbiased one (2e308) is not, but the
    update 0.9 * 1 + 0.1 * 2e308 = 2e307 is: (momentum * var) * correction there (torch gives inf)."""
    shape = (2, 2) if path != "full" else (2, 300_000)  # the latter beyond the small lane
    x = np.zeros(shape)
    x[:, 0] = [1e154, -1e154]
    x[:, 1] = [1.0, 2.0]
    rm, rv = np.zeros(shape[1]), np.ones(shape[1])
    if path in ("small", "full"):
        fastbn.forward(x, running_mean=rm, running_var=rv, momentum=0.1)
    elif path == "mask":
        fastbn.forward(x, running_mean=rm, running_var=rv, momentum=0.1, mask=np.ones((2, 1), bool))
    elif path == "layer":
        layer = fastbn.BatchNorm(shape[1], dtype=np.float64)
        layer(x)
        rv = layer.running_var
    else:
        torch = pytest.importorskip("torch")
        ft = pytest.importorskip("fastbn.torch")
        trv = torch.from_numpy(rv)
        ft.batch_norm(torch.from_numpy(x), torch.from_numpy(rm), trv, training=True, momentum=0.1)
        rv = trv.numpy()
    np.testing.assert_allclose(rv[:2], [2e307, 0.9 + 0.1 * 0.5], rtol=1e-15)


def test_a_folded_bias_whose_difference_alone_overflows_is_finite():
    """fold's bias s * (c - mean): c = 1e308 and mean = -1e308 overflow c - mean, though s * (c - mean) with
    s = 1e-150 is 2e158; each is scaled first there (the other channels as before), without a warning."""
    import warnings

    layer_weight = np.ones((2, 3))
    c, mean, var = np.array([1e308, 1.0]), np.array([-1e308, 0.0]), np.array([1e300, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, folded_bias = fastbn.fold(layer_weight, c, mean, var, None, None, eps=1e-5)
    np.testing.assert_allclose(folded_bias, [2e158, 1.0 / np.sqrt(1.0 + 1e-5)], rtol=1e-15)


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "shape, axis, plan",
    [
        ((5, 3), 1, None),  # the small lane, ROWS
        ((5, 3, 4, 4), 1, None),  # the small lane, SLAB
        ((5, 4, 4, 3), -1, {}),  # the full path, ROWS
        ((8, 3, 6, 7), 1, {"strategy": "fused"}),
        ((8, 3, 6, 7), 1, {"strategy": "streamed", "nontemporal": True}),
    ],
)
def test_values_near_the_float32_limit_normalise_to_finite_outputs(name, shape, axis, plan):
    """x of +-3e38 (float32's and bfloat16's limit is 3.4e38): x - mean reaches 4.8e38, beyond float32, though
    every output is finite (-2 and 0.5 here); the elementwise passes compute in float64 and round once.  The
    same for eval with a running mean of the opposite sign, and for the gradients."""
    dtype = _bfloat16() if name == "bfloat16" else np.dtype(name)
    rng = np.random.default_rng(7)
    x = np.full(shape, 3e38).astype(dtype)
    index = [slice(None)] * len(shape)
    index[0] = 0
    x[tuple(index)] = -3e38
    C = shape[axis]
    weight, bias = np.linspace(0.5, 2.0, C).astype(np.float32), np.linspace(-1.0, 1.0, C).astype(np.float32)
    tol = 2.0**-7 if name == "bfloat16" else 1e-6

    y, saved = fastbn.forward(x, weight, bias, axis=axis, _plan=plan)
    o = oracle_forward(x, weight, bias, axis=axis)
    assert np.isfinite(np.asarray(y, np.float64)).all()
    np.testing.assert_allclose(np.asarray(y, np.float64), o.y, rtol=tol, atol=tol)

    rm, rv = np.full(C, -3e38, np.float32), np.full(C, 3e38, np.float32)
    eval_plan = None if plan is None else {}  # (eval has no fused plan)
    y_eval, _ = fastbn.forward(
        x, weight, bias, running_mean=rm, running_var=rv, training=False, axis=axis, _plan=eval_plan
    )
    o_eval = oracle_forward(x, weight, bias, running_mean=rm, running_var=rv, training=False, axis=axis)
    assert np.isfinite(np.asarray(y_eval, np.float64)).all()  # 6e38 / sqrt(3e38) = 3.5e19
    np.testing.assert_allclose(np.asarray(y_eval, np.float64), o_eval.y, rtol=tol)

    dy = (rng.standard_normal(shape) * 1e30).astype(dtype)  # dweight ~ 1e31: finite
    dx, dweight, dbias = fastbn.backward(dy, x, weight, saved, axis=axis, _plan=plan)
    e_dx, e_dweight, e_dbias = oracle_backward(dy, x, weight, o.mean, o.invstd, True, axis)
    assert np.isfinite(np.asarray(dx, np.float64)).all() and np.isfinite(dweight).all()
    scale = float(np.max(np.abs(np.asarray(dy, np.float64)))) * float(np.max(o.invstd)) * 2.0
    np.testing.assert_allclose(np.asarray(dx, np.float64), e_dx, rtol=0, atol=4 * tol * scale)
    np.testing.assert_allclose(dweight, e_dweight, rtol=4 * tol, atol=0)
    np.testing.assert_allclose(dbias, e_dbias, rtol=4 * tol, atol=0)


@pytest.mark.parametrize("shape, axis", [((16, 3, 5), 1), ((16, 5, 3), -1)])
@pytest.mark.parametrize("spread", [3e18, 1e19, 5e19, 1e21])
def test_bfloat16_channels_whose_float32_blocks_overflow_are_rescued_without_underflow(shape, axis, spread):
    """bfloat16 values spread by 1e18 to 1e21: their squared deviations overflow the float32 blocks, and the
    float64 rescue scaled every value by 2^-600, whose squares (1e-324) underflowed: variance 0 and outputs of
    1e21.  The rescue scales by the channel's own magnitude: invstd and outputs as the float64 oracle's."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * spread + spread).astype(_bfloat16())
    o = oracle_forward(x, axis=axis)
    y, saved = fastbn.forward(x, axis=axis)
    np.testing.assert_allclose(saved.invstd, o.invstd, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float64), o.y, rtol=0, atol=2.0**-6)  # half a bfloat16 ulp at 2..4
    _mean, var = fastbn.moments(x, axis=axis)
    _e_mean, e_var = oracle_moments(x, axis)
    fits = e_var <= np.finfo(np.float32).max  # a variance beyond float32's range is inf in float32
    np.testing.assert_allclose(var[fits], e_var[fits], rtol=1e-5)
    assert np.isinf(var[~fits]).all()


@pytest.mark.parametrize("shape", [(37, 3000), (4096, 64)], ids=["NC-wide-rows", "NC"])
@pytest.mark.parametrize("dtype, offset", [("float64", 1e8), ("float32", 1e4), ("float16", 3000.0)])
def test_rows_gradient_sums_within_their_bound_at_large_means(shape, dtype, offset):
    """The ROWS gradient sums sum(g) and sum((x - mean) g), read through dbias and dweight, at a mean far
    above the spread: float64 and float32 accumulate in float64 (n u64 of the terms' magnitudes), the half
    types in float32 blocks of LANE_BLOCK rows ((B + 1) u, "error bound" in reductions.py), plus the
    result's rounding.  (Under fast-math reassociation, x * g - mean * g would cancel at x's magnitude.)"""
    from fastbn.backends.cpu.plan import LANE_BLOCK

    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _y, saved = fastbn.forward(x)
    _dx, dweight, dbias = fastbn.backward(dy, x, None, saved)
    g = dy.astype(np.float64)
    centred = x.astype(np.float64) - np.asarray(saved.mean, np.float64)
    invstd = np.asarray(saved.invstd, np.float64)
    n, u64 = shape[0], 2.0**-53
    u_sum = (LANE_BLOCK + 1) * 2.0**-24 if dtype == "float16" else 0.0
    u_out = 2.0**-53 if dtype == "float64" else 2.0**-24
    e_dbias, e_dweight = g.sum(axis=0), (centred * g).sum(axis=0) * invstd
    dbias_bound = (u_sum + (n + 4) * u64) * np.abs(g).sum(axis=0) + u_out * np.abs(e_dbias)
    dweight_bound = (u_sum + (n + 4) * u64 + u_out) * np.abs(centred * g).sum(axis=0) * invstd
    assert (np.abs(dbias.astype(np.float64) - e_dbias) <= dbias_bound).all()
    assert (np.abs(dweight.astype(np.float64) - e_dweight) <= dweight_bound + u_out * np.abs(e_dweight)).all()
