"""Hypothesis strategies, tolerances and comparison helpers shared by every fastbn test.

Everything a property test draws comes from here: shapes (rank 2..5, any channel axis,
negative too), dtypes, memory layouts, values, parameters and flags.  Arrays are filled from
a NumPy generator seeded by a drawn integer, so a failing example prints a short, exact
recipe (see ``Case.__repr__``) instead of megabytes of data.

The tolerances of every comparison live in ``TOLERANCES`` below, and only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from oracle import channel_axis, oracle_moments, per_channel, reduce_axes

DTYPES = (np.float16, np.float32, np.float64)
# Not in DTYPES, so that the suite compiles its kernels once more only where a test asks for it
# (tests/test_bfloat16.py draws it on its own).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def stats_dtype(dtype) -> np.dtype:
    """dtype of parameters, running stats and statistics: float32 for the half types and single,
    else float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# Tolerances: the ONLY place they are set.
#
# A comparison passes where   |actual - expected| <= rtol * |expected| + atol * scale + floor
# elementwise.  `scale` is the conditioning of the quantity, computed by the test from the
# oracle (see `conditioning` and `y_scale` below): for y about |w| (1 + K)(1 + |y_hat|) + |b| with
# K = (max|x_c| + |mean_c|) * invstd_c, because rounding x - mean in the working precision costs
# about u * (|x| + |mean|), which the normalisation magnifies by invstd.  On centred data
# K is a few units and the bounds are tight; on data whose mean is large against its spread
# they widen exactly as much as a backward-stable algorithm is entitled to.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    rtol: float  # relative to |expected|
    atol: float  # multiplies the conditioning scale of the quantity
    floor: float = 0.0  # absolute floor (spacing of the output format's subnormals)


TOLERANCES = {
    # float64: unit roundoff u = 1.1e-16; 1e-10 leaves ~1e6 ulps for reductions over up to
    # ~2e4 elements per channel (error <= u * n even for naive summation) and for the
    # different-but-valid summation orders of a kernel.  Any formula error shows up at >= 1e-8.
    np.dtype(np.float64): Tol(rtol=1e-10, atol=1e-10),
    # float32: u = 6.0e-8; 1e-5 is ~170 ulps: a pairwise / blocked reduction over 2e4 elements
    # costs ~u * log2(n) (15 ulps), float64 accumulation far less, plus a few ulps per
    # elementwise operation.  Stats of float16 and bfloat16 input are float32 and use this entry.
    np.dtype(np.float32): Tol(rtol=1e-5, atol=1e-5),
    # float16 outputs (y, dx): the result is rounded to half at the end; half has an 11-bit
    # significand, so rounding alone costs up to 2^-11 = 4.9e-4 relative: rtol 1e-3 is ~2
    # half-ulps.  The arithmetic before that rounding is float32 (atol as float32), and a
    # result that lands among half's subnormals is off by up to half their spacing: floor 2^-24.
    np.dtype(np.float16): Tol(rtol=1e-3, atol=1e-5, floor=2.0**-24),
    # bfloat16 outputs (y, dx): the same float32 arithmetic (widening bfloat16 is exact), then one
    # rounding to nearest of the float32 result v = e + d, |d| <= 1e-5 * scale (the float32 entry),
    # to bfloat16's 8-bit significand: |round(v) - v| <= 2^-8 |v| <= 2^-8 (|e| + |d|), so
    # |round(v) - e| <= 2^-8 |e| + (1 + 2^-8) |d|: rtol 2^-8 = 3.9e-3 (the bound itself, half a
    # bfloat16 ulp), atol float32's times (1 + 2^-8).  Below 2^-126 the spacing is 2^-133 (the
    # subnormals, which the rounding keeps): floor half of it, 2^-134.
    BFLOAT16: Tol(rtol=2.0**-8, atol=1e-5 * (1 + 2.0**-8), floor=2.0**-134),
}

# Central finite differences of the float64 oracle with step h = 1e-5 * sqrt(var_c + eps) per
# channel: truncation error ~ (h / sigma)^2 ~ 1e-10 and cancellation ~ u / h * |y| ~ 1e-10
# relative, so 1e-6 of the channel's gradient scale (atol) plus 1e-6 of each component (rtol)
# is safe yet far below any formula error.
FD_TOL = Tol(rtol=1e-6, atol=1e-6)

# Numerics on data with mean far above spread (test_numerics): variance within 1e-5 relative
# of a float64 two-pass oracle (what the brief requires of a cancellation-free kernel).
NUMERICS_VAR_RTOL = 1e-5


def unit_roundoff(dtype) -> float:
    """u = half an ulp of 1: the relative error of rounding one value to `dtype` (used where a
    test itself rounds data, e.g. x -> a*x + b, and must allow for that rounding)."""
    return float(ml_dtypes.finfo(dtype).eps) / 2  # ml_dtypes' finfo knows NumPy's dtypes and bfloat16


def output_tol(dtype) -> Tol:
    """Tolerance for arrays of x's dtype (y, dx)."""
    return TOLERANCES[np.dtype(dtype)]


def stats_tol(dtype) -> Tol:
    """Tolerance for arrays of the stats dtype (mean, invstd, var, running stats, dweight, dbias)."""
    return TOLERANCES[stats_dtype(dtype)]


def allowed_error(expected, tol: Tol, scale=0.0) -> np.ndarray:
    """tol.rtol * |expected| + tol.atol * scale + tol.floor, elementwise (float64)."""
    e = np.asarray(expected, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), e.shape)
    return tol.rtol * np.abs(e) + tol.atol * s + tol.floor


def assert_within(actual, expected, allowed, what: str = "array", tol: Tol | None = None) -> None:
    """Elementwise |actual - expected| <= allowed; NaN is expected exactly where expected is
    NaN, and infinities must match exactly."""
    actual = np.asarray(actual)
    assert actual.shape == np.shape(expected), f"{what}: shape {actual.shape} != expected {np.shape(expected)}"
    a = actual.astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    allowed = np.broadcast_to(np.asarray(allowed, dtype=np.float64), e.shape)
    with np.errstate(invalid="ignore"):
        ok = np.abs(a - e) <= allowed
    ok |= np.isnan(a) & np.isnan(e)
    ok |= np.isinf(e) & (a == e)
    if not ok.all():
        bad = np.argwhere(~ok)
        idx = tuple(bad[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            worst = np.nanmax(np.where(ok, 0.0, np.abs(a - e) / allowed))
        raise AssertionError(
            f"{what}: {len(bad)} of {e.size} elements out of tolerance{'' if tol is None else ' ' + str(tol)}; "
            f"first at {idx}: got {a[idx]!r}, expected {e[idx]!r}, allowed error {allowed[idx]:.3g}; "
            f"worst error / allowed = {worst:.3g}"
        )


def assert_close(actual, expected, tol: Tol, scale=0.0, what: str = "array") -> None:
    """Elementwise |actual - expected| <= tol.rtol*|expected| + tol.atol*scale + tol.floor."""
    assert_within(actual, expected, allowed_error(expected, tol, scale), what, tol)


def channel_max_abs(a, axis: int) -> np.ndarray:
    """max |a| per channel, float64, shape (C,)."""
    a64 = np.abs(np.asarray(a, dtype=np.float64))
    return np.max(a64, axis=reduce_axes(a64.ndim, axis))


def conditioning(x, mean, invstd, axis: int) -> np.ndarray:
    """K_c = (max|x_c| + |mean_c|) * invstd_c: how much rounding x - mean is magnified."""
    return (channel_max_abs(x, axis) + np.abs(mean)) * np.asarray(invstd, dtype=np.float64)


def mean_scale(x, mean, axis: int) -> np.ndarray:
    """Scale of a per-channel mean: max|x_c| + |mean_c| (rounding each element costs u * |x|)."""
    return channel_max_abs(x, axis) + np.abs(np.asarray(mean, dtype=np.float64))


def var_scale(x, mean, var, axis: int, tol: Tol) -> np.ndarray:
    """Scale of a per-channel biased variance: a * sqrt(var) + atol * a^2 with a = mean_scale.

    Rounding x - mean costs u * a per element, which moves var by ~ a * sqrt(var) (first
    order) and by (u a)^2 (second order: the only term left when a channel is constant).
    """
    a = mean_scale(x, mean, axis)
    return a * np.sqrt(np.asarray(var, dtype=np.float64)) + tol.atol * a * a


def invstd_scale(x, mean, invstd, axis: int, tol: Tol) -> np.ndarray:
    """Scale of invstd: invstd * K * (1 + atol K), i.e. relative error up to atol * K (1 + atol K),
    what var_scale allows for var + eps (since a^2 / (var + eps) = K^2)."""
    k = conditioning(x, mean, invstd, axis)
    return np.abs(np.asarray(invstd, dtype=np.float64)) * k * (1 + tol.atol * k)


def y_scale(x, mean, invstd, weight, bias, axis: int, tol: Tol) -> np.ndarray:
    """Scale of y = y_hat * w + b, y_hat = (x - mean) * invstd, elementwise:
    |w| * (1 + K) * (1 + atol K) * (1 + |y_hat|) + |b|: the error of x - mean (K) plus the
    relative error of invstd (K (1 + atol K)) times |y_hat|; tol is the stats tolerance."""
    x64 = np.asarray(x, dtype=np.float64)
    nd = x64.ndim
    k = conditioning(x64, mean, invstd, axis)
    w = np.ones_like(k) if weight is None else np.abs(np.asarray(weight, np.float64))
    b = np.zeros_like(k) if bias is None else np.abs(np.asarray(bias, np.float64))
    y_hat = (x64 - per_channel(mean, nd, axis)) * per_channel(invstd, nd, axis)
    return per_channel(w * (1 + k) * (1 + tol.atol * k), nd, axis) * (1 + np.abs(y_hat)) + per_channel(b, nd, axis)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
# Occasional "large batch" cases (drawn about once in 16): long reductions, where blocked or
# parallel accumulation and the merging of partial results actually run, channel-first and
# channel-last.
LARGE_SHAPES = (
    ((4096, 3), 1),
    ((2, 3, 2000), 1),
    ((20000, 1), -1),
    ((3000, 2, 3), -1),
    ((2, 2, 64, 64), -3),
)
# Upper bound on each non-channel dimension, per rank, so that typical cases stay small.
_DIM_MAX = {2: 512, 3: 48, 4: 12, 5: 8}


@st.composite
def shapes_and_axes(draw, *, min_rank=2, max_rank=5, max_elems=20_000, min_count=2, allow_large=True, max_channels=300):
    """(shape, axis): rank in [min_rank, max_rank], axis any valid value (negative too),
    C in [1, max_channels] biased to small, total elements <= max_elems (except for the
    occasional large case), at least min_count elements per channel."""
    if allow_large and draw(st.integers(0, 15)) == 15:
        return draw(st.sampled_from(LARGE_SHAPES))
    max_channels = max(1, min(max_channels, max_elems // min_count))
    rank = draw(st.integers(min_rank, max_rank))
    ax = draw(st.integers(0, rank - 1))
    negative = draw(st.booleans())
    channels = draw(
        st.one_of(
            st.integers(1, min(4, max_channels)), st.integers(1, min(32, max_channels)), st.integers(1, max_channels)
        )
    )
    budget = max(1, max_elems // channels)
    dims: list[int] = []
    for _ in range(rank - 1):
        room = max(1, min(_DIM_MAX[rank], budget // math.prod(dims)))
        dims.append(draw(st.integers(1, room)))
    if math.prod(dims) < min_count:
        dims[0] *= min_count
    shape = (*dims[:ax], channels, *dims[ax:])
    return shape, (ax - rank if negative else ax)


# ---------------------------------------------------------------------------------------------
# Memory layouts: the logical array is the same, only its strides differ.
# ---------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "channels_last", "strided")


@st.composite
def layouts(draw, ndim: int, kinds=LAYOUTS):
    kind = draw(st.sampled_from(kinds))
    if kind == "transposed":
        return kind, tuple(draw(st.permutations(range(ndim))))
    if kind == "strided":
        return kind, (draw(st.integers(0, ndim - 1)), draw(st.sampled_from((2, -1, 3, -2))))
    return kind, ()


def place(values: np.ndarray, dtype, layout, axis: int) -> np.ndarray:
    """An array of `dtype` holding `values` with the memory layout described by `layout`.

    Memory that the view skips over ("strided") is filled with NaN, so a kernel that reads
    with the wrong strides produces NaN instead of a plausible number.
    """
    kind, detail = layout
    shape = values.shape
    nd = len(shape)
    ax = channel_axis(nd, axis)
    if kind == "contiguous":
        out = np.empty(shape, dtype)
    elif kind == "transposed":  # a contiguous array of permuted shape, transposed back
        perm = detail
        out = np.empty([shape[p] for p in perm], dtype).transpose(np.argsort(perm))
    elif kind == "channels_last":  # channels contiguous, moved to the channel axis
        base = np.empty(shape[:ax] + shape[ax + 1 :] + (shape[ax],), dtype)
        out = np.moveaxis(base, -1, ax)
    elif kind == "strided":  # a slice with a step (possibly negative) along one dimension
        dim, step = detail
        big = list(shape)
        big[dim] *= abs(step)
        base = np.full(big, np.nan, dtype)
        index = [slice(None)] * nd
        index[dim] = slice(None, None, step)
        out = base[tuple(index)]
    else:  # pragma: no cover - strategies only produce the kinds above
        raise AssertionError(kind)
    assert out.shape == shape
    out[...] = values.astype(dtype)
    return out


# Data scale (spread) exponents: half keeps values (offset + 5 spreads) far below 65504 and
# spreads far above its subnormals; bfloat16 has float32's exponent range.
_SCALE_EXPONENTS = {
    np.dtype(np.float16): (-2, 2),
    BFLOAT16: (-3, 3),
    np.dtype(np.float32): (-3, 3),
    np.dtype(np.float64): (-3, 3),
}
OFFSET_RATIOS = (0.0, 1.0, 10.0, 50.0)  # |per-channel mean| / spread is drawn up to this


def channel_values(rng, shape, axis, scale, offset_ratio) -> np.ndarray:
    """float64 normal values, with a random offset and spread per channel."""
    nd = len(shape)
    channels = shape[channel_axis(nd, axis)]
    offset = scale * rng.uniform(-offset_ratio, offset_ratio, channels)
    spread = scale * rng.uniform(0.5, 2.0, channels)
    return per_channel(offset, nd, axis) + per_channel(spread, nd, axis) * rng.standard_normal(shape)


@dataclass(frozen=True, repr=False)
class Case:
    """One input array x and how it was made (the repr is a reproduction recipe)."""

    x: np.ndarray
    axis: int  # as passed to fastbn (may be negative)
    seed: int
    layout: tuple
    scale: float
    offset_ratio: float

    def __repr__(self):
        return (
            f"Case(shape={self.x.shape}, dtype={self.x.dtype}, axis={self.axis}, layout={self.layout}, "
            f"strides={self.x.strides}, seed={self.seed}, scale={self.scale:g}, offset_ratio={self.offset_ratio:g})"
        )

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    @property
    def sdtype(self) -> np.dtype:
        return stats_dtype(self.x.dtype)

    @property
    def channel(self) -> int:
        return channel_axis(self.x.ndim, self.axis)

    @property
    def channels(self) -> int:
        return self.x.shape[self.channel]

    @property
    def count(self) -> int:
        return self.x.size // self.channels

    def rng(self, stream: int) -> np.random.Generator:
        """An independent generator for auxiliary data (parameters, dy, ...)."""
        return np.random.default_rng([self.seed, stream])


@st.composite
def cases(
    draw, *, dtypes=DTYPES, layout_kinds=LAYOUTS, offset_ratios=OFFSET_RATIOS, scale_exponents=None, **shape_kw
) -> Case:
    """A Case: drawn dtype, shape/axis (see shapes_and_axes for shape_kw), layout and values."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape, axis = draw(shapes_and_axes(**shape_kw))
    layout = draw(layouts(len(shape), layout_kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    lo, hi = scale_exponents or _SCALE_EXPONENTS[dtype]
    scale = 10.0 ** draw(st.integers(lo, hi))
    offset_ratio = draw(st.sampled_from(offset_ratios))
    values = channel_values(np.random.default_rng(seed), shape, axis, scale, offset_ratio)
    return Case(place(values, dtype, layout, axis), axis, seed, layout, scale, offset_ratio)


def like(case: Case, values: np.ndarray, layout=None) -> np.ndarray:
    """Another array of x's shape and dtype (e.g. dy), by default with x's layout."""
    return place(values, case.dtype, case.layout if layout is None else layout, case.axis)


# ---------------------------------------------------------------------------------------------
# Parameters and forward inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None


def make_params(case: Case, *, weight=True, bias=True, running=True) -> Params:
    """Parameters of the stats dtype: |weight| in [0.25, 2] with random sign, bias N(0, 2),
    running mean near the batch mean and running var within 4x of scale^2."""
    rng = case.rng(1)
    channels = case.channels
    w = rng.uniform(0.25, 2.0, channels) * rng.choice((-1.0, 1.0), channels)
    b = rng.normal(0.0, 2.0, channels)
    mean, _ = oracle_moments(case.x, case.axis)
    rm = mean + case.scale * rng.normal(0.0, 0.5, channels)
    rv = case.scale**2 * rng.uniform(0.25, 4.0, channels)
    sd = case.sdtype
    return Params(
        w.astype(sd) if weight else None,
        b.astype(sd) if bias else None,
        rm.astype(sd) if running else None,
        rv.astype(sd) if running else None,
    )


@dataclass(frozen=True)
class ForwardInputs:
    case: Case
    params: Params
    training: bool
    momentum: float
    eps: float

    def running_copies(self):
        """Fresh copies of the running stats (fastbn updates them in place)."""
        p = self.params
        return (
            None if p.running_mean is None else p.running_mean.copy(),
            None if p.running_var is None else p.running_var.copy(),
        )


MOMENTA = (0.1, 0.0, 1.0, 0.37)
EPSILONS = (1e-5, 1e-3, 1e-8)


@st.composite
def forward_inputs(draw, *, training=None, running=None, weight=None, bias=None, **case_kw) -> ForwardInputs:
    """A Case plus drawn parameters and flags; pass a value to pin any of the four choices."""
    case = draw(cases(**case_kw))

    def pick(value):
        return draw(st.booleans()) if value is None else value

    params = make_params(case, weight=pick(weight), bias=pick(bias), running=pick(running))
    return ForwardInputs(case, params, pick(training), draw(st.sampled_from(MOMENTA)), draw(st.sampled_from(EPSILONS)))


def backward_scales(x, dy, mean, invstd, weight, axis: int, tol: Tol):
    """Conditioning scales of (dx, dweight, dbias); tol is the stats tolerance.

    dx = invstd * w * (dy - mean(dy) - y_hat * mean(dy * y_hat)): every term is bounded by
    max|dy_c| * (1 + |y_hat|), and y_hat carries the error of x - mean and of invstd (as in
    y_scale), hence invstd |w| max|dy_c| (1 + K)(1 + atol K)(1 + |y_hat|).
    dweight = sum(dy * y_hat): sum |dy| (1 + |y_hat|) (1 + K)(1 + atol K).  dbias = sum(dy): sum |dy|.
    """
    x64 = np.asarray(x, dtype=np.float64)
    dy64 = np.abs(np.asarray(dy, dtype=np.float64))
    nd = x64.ndim
    axes = reduce_axes(nd, axis)
    invstd = np.asarray(invstd, dtype=np.float64)
    k = conditioning(x64, mean, invstd, axis)
    w = np.ones_like(k) if weight is None else np.abs(np.asarray(weight, np.float64))
    growth = (1 + k) * (1 + tol.atol * k)
    y_hat = np.abs((x64 - per_channel(mean, nd, axis)) * per_channel(invstd, nd, axis))
    dx_scale = per_channel(invstd * w * np.max(dy64, axis=axes) * growth, nd, axis) * (1 + y_hat)
    dweight_scale = np.sum(dy64 * (1 + y_hat), axis=axes) * growth
    dbias_scale = np.sum(dy64, axis=axes)
    return dx_scale, dweight_scale, dbias_scale
