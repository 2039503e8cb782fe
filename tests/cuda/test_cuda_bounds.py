"""The error bound of the CUDA statistics kernels (fastbn.backends.cuda.reductions.RUN), against exact sums.

Each case computes a channel's mean and biased variance on the device and exactly (Python fractions over
the input's values), and checks the error against the bound that RUN's comment derives:

    |v^ - v| <= E_v (v + (m - p)^2) + u_out v,   |mean^ - mean| <= E_m sqrt(v + (m - p)^2) + u_out |mean|

with p the channel's pivot (its first element), E_m and E_v from the run length, the merge levels L = J + 11
(J runs on a thread) and the splits S of the launch (:func:`bound`).  The data are adversarial: a mean far
above the spread (where E[x^2] - E[x]^2 on raw values would lose every digit), a pivot that is itself an
outlier by many standard deviations (the bound's (m - p)^2 / v factor, at the edge where the bound nears
the variance), many elements and runs per thread, and float16, float32 and float64 input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import fastbn
from fastbn.backends.cuda import reductions

from gpu_arrays import gpu, host


def bound(dtype, runs_per_thread, splits, spread2):
    """(mean bound, variance bound) of RUN's comment, point 4, for ``spread2`` = v + (m - p)^2 and the
    variance v added by the caller (the u_out terms)."""
    u = 2.0**-53 if np.dtype(dtype) == np.float64 else 2.0**-24
    u64 = 2.0**-53
    run = reductions.RUN
    levels = runs_per_thread + 11
    e_m = (run + 2 + 3 * levels) * u + 3 * splits * u64
    e_v = (3 * run + 9) * u + levels * (4 * (run + 2 + 3 * levels) + 12) * u + splits * (4 * e_m + 12 * u64)
    return e_m * math.sqrt(spread2), e_v * spread2


def exact_moments(values):
    """Exact mean and biased variance (as fractions) of a 1-D array of floats."""
    fractions = [Fraction(float(v)) for v in values]
    n = len(fractions)
    mean = sum(fractions) / n
    return mean, sum((f - mean) ** 2 for f in fractions) / n


def runs_per_thread(launches, layout):
    """J: the most runs of RUN elements any thread of the launch's statistics kernel folds."""
    block, args = next((entry[2], entry[3]) for entry in launches if entry[0].startswith("stats_"))
    if layout == "rows":
        rows_per_split = args[4]
        return math.ceil(math.ceil(rows_per_split / block[1]) / reductions.RUN)
    _x, _channels, _inner, _group_size, _first, width, row_chunk, col_chunk, _col_splits, rows_inner = args[:10]
    height = block[0] // width
    rows, cols = math.ceil(row_chunk / height), math.ceil(col_chunk / width)
    n_out, n_in = (cols, rows) if rows_inner else (rows, cols)
    return n_out * math.ceil(n_in / reductions.RUN)


def check(values, dtype, layout, launches, channels=2):
    """Moments of ``values`` (N elements per channel, in ``channels`` copies with other spreads) on the
    device against the exact ones and the bound; returns the worst error / bound ratio."""
    rng = np.random.default_rng(0)
    columns = [values] + [values * (1 + 0.5 * c) + rng.standard_normal(values.size) for c in range(1, channels)]
    data = np.stack(columns).astype(dtype)  # (C, N)
    if layout == "slab":
        x = data.reshape(channels, 4, -1).transpose(1, 0, 2).copy()  # (4, C, N / 4): rows of N / 4
        axis = 1
    else:
        x = np.ascontiguousarray(data.T)  # (N, C)
        axis = -1
    del launches[:]
    mean, var = fastbn.moments(gpu(x), axis=axis)
    mean, var = host(mean), host(var)
    u_out = np.finfo(mean.dtype).eps / 2
    splits = next(grid for name, grid, _, _ in launches if name.startswith("stats_"))[1]
    j = runs_per_thread(launches, layout)
    worst = 0.0
    for c in range(channels):
        column = data[c]
        exact_mean, exact_var = exact_moments(column)
        pivot = Fraction(float(column[0]))
        spread2 = float(exact_var + (exact_mean - pivot) ** 2)
        mean_bound, var_bound = bound(dtype, j, splits, spread2)
        mean_bound += u_out * abs(float(exact_mean))
        var_bound += u_out * float(exact_var)
        mean_error = abs(Fraction(float(mean[c])) - exact_mean)
        var_error = abs(Fraction(float(var[c])) - exact_var)
        assert mean_error <= mean_bound, (c, float(mean_error), mean_bound)
        assert var_error <= var_bound, (c, float(var_error), var_bound, float(exact_var))
        worst = max(worst, float(var_error) / var_bound)
    return worst


DTYPES = [np.float16, np.float32, np.float64]
LAYOUTS = ["slab", "rows"]


@pytest.fixture
def one_block(small_launches):
    """One warp, one block per channel: every thread folds several runs (J > 1)."""
    small_launches.MAX_SPLITS = 1
    return small_launches


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_mean_far_above_the_spread(dtype, layout, one_block, launches):
    """mean 1e3 (float16) or 1e4 / 1e8, spread 1: raw sums of squares would cancel every digit
    (1e8^2 / 1 is far beyond 1 / u); the pivot is a typical element, so the bound is a few hundred u."""
    offset = {np.float16: 1e3, np.float32: 1e4, np.float64: 1e8}[dtype]
    values = offset + np.random.default_rng(1).standard_normal(32 * 200)
    assert check(values, dtype, layout, launches) <= 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_pivot_an_outlier_at_the_edge_of_the_bound(dtype, layout, one_block, launches):
    """The first element R standard deviations away, R chosen so that the bound's (m - p)^2 / v factor
    brings it near a tenth of the variance: the error grows with R^2 and stays within the bound."""
    n = 32 * 200
    rng = np.random.default_rng(2)
    _, v_bound = bound(dtype, math.ceil(n / 32 / reductions.RUN) * 2, 1, 1.0)
    r = min(math.sqrt(0.1 / v_bound), 0.5 * math.sqrt(n))  # (m - p)^2 / v <= N always
    if dtype == np.float16:
        r = min(r, 30.0)  # float16 holds 100 + R (a spread of 1 around 100) to 1/16 for R <= 30
    values = 100.0 + rng.standard_normal(n)
    values[0] = 100.0 + r
    ratio = check(values, dtype, layout, launches)
    assert ratio <= 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_splits_and_float64_merges(layout, small_launches, launches):
    """Several blocks per channel (float64 merges of the partials) on data far from 0."""
    values = 5e5 + 3.0 * np.random.default_rng(3).standard_normal(32 * 96)
    check(values, np.float32, layout, launches)
    assert any(grid[1] > 1 for name, grid, _, _ in launches if name.startswith("stats_"))


def test_the_bound_is_needed_without_the_pivot():
    """The shift is what makes the sum of squares safe: on the same data without it (p = 0), float32's
    E[x^2] - E[x]^2 is off by more than the variance, far beyond the bound with the pivot."""
    values = (1e4 + np.random.default_rng(4).standard_normal(4096)).astype(np.float32)
    s = np.float32(0)
    q = np.float32(0)
    for v in values:
        s = np.float32(s + v)
        q = np.float32(q + v * v)
    n = np.float32(values.size)
    naive = float(q / n - (s / n) ** 2)
    _, exact_var = exact_moments(values)
    _, with_pivot = bound(np.float32, 2, 1, float(exact_var) * 1.01)
    assert abs(naive - float(exact_var)) > float(exact_var) > 100 * with_pivot
