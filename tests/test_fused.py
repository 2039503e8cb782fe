"""Fused and extended batch norm on the CPU: ReLU, residual add, ghost batches, batch
renormalization and folding, against the float64 oracle extended from the definitions
(tests/oracle.py), over every dtype, rank, channel axis and memory layout.  The oracle's own
gradients are checked against finite differences of its forward, so the backward tests compare
against a derivation that is itself tested.  The same strategies run on the CUDA backend under
the simulator (tests/cuda)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn

from oracle import (
    assert_plans_agree,
    oracle_backward_extended,
    oracle_fold,
    oracle_forward_extended,
    oracle_moments,
    per_channel,
)
from strategies import (
    BFLOAT16,
    EPSILONS,
    FD_TOL,
    TOLERANCES,
    assert_close,
    backward_scales,
    cases,
    forward_inputs,
    layouts,
    like,
    make_params,
    mean_scale,
    output_tol,
    stats_dtype,
    stats_tol,
    var_scale,
    y_scale,
)

RENORM_LIMITS = ((1.0, 0.0), (1.5, 0.5), (3.0, 5.0), (math.inf, math.inf), (1.05, 0.01))


# ----------------------------------------------------------------- draws ---
@st.composite
def fused_options(draw, inp, *, allow_renorm=True, allow_ghost=True):
    """Options for forward that suit ``inp``: activation, residual (with its own layout),
    virtual_batch_size (a divisor of the batch leaving >= 2 values per channel and group) and
    renorm (training with running statistics only, never with ghost batches)."""
    case, p = inp.case, inp.params
    options = {"activation": draw(st.sampled_from((None, "relu")), label="activation")}
    if draw(st.booleans(), label="residual"):
        layout = draw(layouts(case.x.ndim), label="residual layout")
        options["residual"] = like(case, case.rng(4).standard_normal(case.x.shape) * case.scale, layout=layout)
    batch = case.x.shape[0]
    sizes = [k for k in range(1, batch) if batch % k == 0 and case.count // (batch // k) >= 2]
    if allow_ghost and case.channel != 0 and sizes and draw(st.booleans(), label="ghost"):
        options["virtual_batch_size"] = draw(st.sampled_from(sizes), label="virtual_batch_size")
    elif allow_renorm and inp.training and p.running_mean is not None and draw(st.booleans(), label="renorm"):
        options["renorm"] = draw(st.sampled_from(RENORM_LIMITS), label="renorm")
    return options


def _oracle(inp, options):
    case, p = inp.case, inp.params
    return oracle_forward_extended(
        case.x,
        p.weight,
        p.bias,
        running_mean=p.running_mean,
        running_var=p.running_var,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
        **options,
    )


def _run_forward(inp, options):
    case, p = inp.case, inp.params
    rm, rv = inp.running_copies()
    y, saved = fastbn.forward(
        case.x,
        p.weight,
        p.bias,
        running_mean=rm,
        running_var=rv,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
        **options,
    )
    return y, saved, rm, rv


def _ghost_split(a, options, o):
    """a's ghost batches (or [a]) and the matching rows of the oracle's statistics."""
    k = options.get("virtual_batch_size")
    if k is None or not o.batch_stats:
        return [(np.asarray(a), o.mean, o.invstd)]
    return [(np.asarray(a)[g * k : (g + 1) * k], o.mean[g], o.invstd[g]) for g in range(o.mean.shape[0])]


def _y_allowed_scale(inp, options, o):
    """Conditioning scale of y: y_scale of the BN part (per ghost batch, with the renormalised
    weight r w and shift |d w| + |b|) plus |residual| (rounded to x's dtype, then added)."""
    case, p = inp.case, inp.params
    st_tol = stats_tol(case.dtype)
    w = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    b = np.zeros(case.channels) if p.bias is None else p.bias.astype(np.float64)
    if o.r is not None:
        w, b = o.r * w, np.abs(o.d * w) + np.abs(b)
    parts = [
        y_scale(xg, mean, invstd, w, b, case.axis, st_tol) for xg, mean, invstd in _ghost_split(case.x, options, o)
    ]
    scale = np.concatenate(parts, axis=0)
    if "residual" in options:
        scale = scale + np.abs(np.asarray(options["residual"], np.float64))
    return scale


# ---------------------------------------------------------------- forward ---
@given(forward_inputs(), st.data())
def test_fused_forward_matches_oracle(inp, data):
    options = data.draw(fused_options(inp), label="options")
    case, p = inp.case, inp.params
    x_before = case.x.copy()
    residual_before = options["residual"].copy() if "residual" in options else None
    y, saved, rm, rv = _run_forward(inp, options)
    o = _oracle(inp, options)
    st_tol = stats_tol(case.dtype)

    assert isinstance(y, np.ndarray) and y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, o.y, output_tol(case.dtype), scale=_y_allowed_scale(inp, options, o), what="y")
    if options.get("activation") == "relu":
        assert not (y < 0).any(), "relu output has negative values"

    # saved: statistics per ghost batch when ghost batches were used; r and d with renorm
    ghost = "virtual_batch_size" in options and o.batch_stats
    assert saved.activation == options.get("activation") and saved.residual == ("residual" in options)
    assert saved.virtual_batch_size == (options["virtual_batch_size"] if ghost else None)
    assert saved.mean.shape == o.mean.shape and saved.invstd.shape == o.invstd.shape
    assert saved.mean.dtype == case.sdtype and saved.invstd.dtype == case.sdtype
    scale_mean = np.stack([mean_scale(xg, m, case.axis) for xg, m, _ in _ghost_split(case.x, options, o)])
    assert_close(saved.mean, o.mean, st_tol, scale=scale_mean.reshape(o.mean.shape), what="saved.mean")
    if o.r is None:
        assert saved.r is None and saved.d is None
    else:
        # r and d are clipped ratios of statistics: relative error of the statistics they come from
        k = (np.abs(o.mean) + np.abs(p.running_mean)) * o.invstd
        assert saved.r.dtype == case.sdtype and saved.d.dtype == case.sdtype
        assert_close(saved.r, o.r, st_tol, scale=np.abs(o.r) * (1 + k), what="r")
        assert_close(saved.d, o.d, st_tol, scale=1 + np.abs(o.d) + k, what="d")

    # running statistics: the documented rule, from the statistics before this step
    if p.running_mean is not None and inp.training:
        m = inp.momentum
        groups = _ghost_split(case.x, options, o)
        n = case.count // len(groups)
        spread = np.stack([mean_scale(xg, mm, case.axis) for xg, mm, _ in groups]).max(0)
        # the scale of one group's biased variance (as in test_forward), largest over the groups
        group_var = np.stack(
            [var_scale(xg, mm, np.maximum(1.0 / inv**2 - inp.eps, 0.0), case.axis, st_tol) for xg, mm, inv in groups]
        ).max(0)
        assert_close(rm, o.running_mean, st_tol, scale=np.abs(p.running_mean) + m * spread, what="running_mean")
        assert_close(
            rv, o.running_var, st_tol, scale=np.abs(p.running_var) + m * n / (n - 1) * group_var, what="running_var"
        )
    elif p.running_mean is not None:
        assert rm.tobytes() == p.running_mean.tobytes() and rv.tobytes() == p.running_var.tobytes()
    assert np.array_equal(case.x, x_before, equal_nan=True)
    if residual_before is not None:
        assert np.array_equal(options["residual"], residual_before, equal_nan=True)


# --------------------------------------------------------------- backward ---
@given(forward_inputs(), st.data())
def test_fused_backward_matches_oracle(inp, data):
    options = data.draw(fused_options(inp), label="options")
    case, p = inp.case, inp.params
    y, saved, _, _ = _run_forward(inp, options)
    dy = like(case, case.rng(2).standard_normal(case.x.shape), layout=data.draw(layouts(case.x.ndim), label="dy"))
    relu = options.get("activation") == "relu"
    out = fastbn.backward(dy, case.x, p.weight, saved, axis=case.axis, y=y if relu else None)
    o = _oracle(inp, options)
    e_dx, e_dweight, e_dbias, e_dres = oracle_backward_extended(
        dy,
        case.x,
        p.weight,
        o.mean,
        o.invstd,
        o.batch_stats,
        case.axis,
        y=y if relu else None,
        r=o.r,
        d=o.d,
        virtual_batch_size=options.get("virtual_batch_size"),
    )

    assert len(out) == (4 if "residual" in options else 3)
    dx, dweight, dbias = out[:3]
    st_tol = stats_tol(case.dtype)
    g = np.where(np.asarray(y, np.float64) > 0, np.asarray(dy, np.float64), 0.0) if relu else np.asarray(dy, float)
    w = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    w_eff = w if o.r is None else o.r * w
    dx_parts, dw_scale, db_scale = [], 0.0, 0.0
    for (xg, mean, invstd), (gg, _, _) in zip(_ghost_split(case.x, options, o), _ghost_split(g, options, o)):
        s_dx, s_dw, s_db = backward_scales(xg, gg, mean, invstd, w_eff, case.axis, st_tol)
        dx_parts.append(s_dx)
        dw_scale, db_scale = dw_scale + s_dw, db_scale + s_db
    if o.r is not None:
        dw_scale = np.abs(o.r) * dw_scale + np.abs(o.d) * db_scale
    assert dx.dtype == case.dtype and dx.shape == case.x.shape
    assert_close(dx, e_dx, output_tol(case.dtype), scale=np.concatenate(dx_parts, axis=0), what="dx")
    assert_close(dweight, e_dweight, st_tol, scale=dw_scale, what="dweight")
    assert_close(dbias, e_dbias, st_tol, scale=db_scale, what="dbias")
    if "residual" in options:
        dres = out[3]
        assert dres.dtype == case.dtype and dres.shape == case.x.shape
        # the masked dy, rounded to x's dtype: exact
        assert np.array_equal(dres.astype(np.float64), e_dres.astype(case.dtype).astype(np.float64))


@given(forward_inputs(training=True, running=True, dtypes=(np.float32,)), st.data())
def test_relu_backward_needs_the_output_and_ignores_it_otherwise(inp, data):
    case, p = inp.case, inp.params
    rm, rv = inp.running_copies()
    y, saved = fastbn.forward(
        case.x, p.weight, p.bias, running_mean=rm, running_var=rv, axis=case.axis, activation="relu"
    )
    dy = np.ones_like(case.x)
    with pytest.raises(ValueError, match=r"^y: forward applied activation='relu'"):
        fastbn.backward(dy, case.x, p.weight, saved, axis=case.axis)
    with pytest.raises(ValueError, match=r"^y: expected the shape of x"):
        fastbn.backward(dy, case.x, p.weight, saved, axis=case.axis, y=y.ravel())
    # without the ReLU, y changes nothing
    y2, saved2 = fastbn.forward(case.x, p.weight, p.bias, axis=case.axis)
    a = fastbn.backward(dy, case.x, p.weight, saved2, axis=case.axis)
    b = fastbn.backward(dy, case.x, p.weight, saved2, axis=case.axis, y=-np.abs(y2))
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


# ------------------------------------------- the oracle's own derivation ---
def _finite_differences(loss, arrays, steps):
    """Central differences of the scalar ``loss(*arrays)`` with respect to each array."""
    grads = []
    for which, (arr, h) in enumerate(zip(arrays, steps)):
        grad = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = [a.copy() for a in arrays], [a.copy() for a in arrays]
            plus[which][idx] += h[idx]
            minus[which][idx] -= h[idx]
            grad[idx] = (loss(*plus) - loss(*minus)) / (2 * h[idx])
        grads.append(grad)
    return grads


@settings(max_examples=15)
@given(
    cases(
        dtypes=(np.float64,),
        max_elems=48,
        allow_large=False,
        max_rank=3,
        offset_ratios=(0.0, 1.0),
        scale_exponents=(0, 0),
    ),
    st.sampled_from(("relu", "residual", "ghost", "renorm")),
    st.sampled_from(EPSILONS),
)
def test_oracle_backward_is_the_gradient_of_oracle_forward(case, variant, eps):
    """float64 finite differences of the oracle's extended forward agree with its backward."""
    p = make_params(case)
    x = np.array(case.x, np.float64)
    R = case.rng(3).standard_normal(x.shape)
    z = case.rng(4).standard_normal(x.shape)
    batch = x.shape[0]
    options = {}
    if variant == "relu":
        options["activation"] = "relu"
    elif variant == "residual":
        options["residual"] = z
    elif variant == "ghost":
        sizes = [k for k in range(1, batch) if batch % k == 0 and case.count // (batch // k) >= 2]
        if case.channel == 0 or not sizes:
            return
        options["virtual_batch_size"] = sizes[-1]
    else:
        options["renorm"] = (1.5, 0.5)
    w, b = p.weight.astype(np.float64), p.bias.astype(np.float64)

    def forward(xv, wv, bv, zv):
        opts = dict(options, residual=zv) if "residual" in options else options
        return oracle_forward_extended(
            xv, wv, bv, running_mean=p.running_mean, running_var=p.running_var, eps=eps, axis=case.axis, **opts
        )

    o = forward(x, w, b, z)
    if variant == "relu":
        pre = oracle_forward_extended(
            x, w, b, running_mean=p.running_mean, running_var=p.running_var, eps=eps, axis=case.axis
        ).y
        if np.min(np.abs(pre)) < 1e-3:
            return  # a kink within reach of the step: the central difference is meaningless there
    _, var = oracle_moments(x, case.axis)
    h_x = np.broadcast_to(per_channel(1e-5 * np.sqrt(var + eps), x.ndim, case.axis), x.shape)
    h_c = np.full(w.shape, 1e-5)
    if variant == "renorm":
        # r and d are constants in backward: differentiate with them frozen at their values
        r, d = o.r, o.d
        nd = x.ndim

        def loss(xv, wv, bv, zv):
            mean, var_ = oracle_moments(xv, case.axis)
            x_hat = (xv - per_channel(mean, nd, case.axis)) / per_channel(np.sqrt(var_ + eps), nd, case.axis)
            y = (x_hat * per_channel(r, nd, case.axis) + per_channel(d, nd, case.axis)) * per_channel(wv, nd, case.axis)
            return np.sum((y + per_channel(bv, nd, case.axis)) * R)
    else:

        def loss(xv, wv, bv, zv):
            return np.sum(forward(xv, wv, bv, zv).y * R)

    fd = _finite_differences(loss, [x, w, b, z], [h_x, h_c, h_c, np.full(x.shape, 1e-5)])
    got = oracle_backward_extended(
        R,
        x,
        w,
        o.mean,
        o.invstd,
        True,
        case.axis,
        y=o.y if variant == "relu" else None,
        r=o.r,
        d=o.d,
        virtual_batch_size=options.get("virtual_batch_size"),
    )
    names = ("dx", "dweight", "dbias", "dresidual")
    for name, analytic, numeric in zip(names, got, fd):
        if name == "dresidual" and variant != "residual":
            continue
        scale = np.max(np.abs(numeric)) + np.max(np.abs(R)) * (1 + np.max(np.abs(o.invstd)))
        assert_close(analytic, numeric, FD_TOL, scale=scale, what=f"{name} ({variant}) vs finite differences")


# --------------------------------------------------- plans and consistency ---
@given(forward_inputs(training=True, running=False, dtypes=(np.float32, np.float64)), st.data())
def test_fused_equals_separate_calls(inp, data):
    """relu(BN(x) + z) equals BN, add and ReLU done one after another, to rounding of the sum."""
    case, p = inp.case, inp.params
    z = like(case, case.rng(4).standard_normal(case.x.shape) * case.scale)
    fused, _ = fastbn.forward(case.x, p.weight, p.bias, eps=inp.eps, axis=case.axis, residual=z, activation="relu")
    plain, _ = fastbn.forward(case.x, p.weight, p.bias, eps=inp.eps, axis=case.axis)
    separate = np.maximum(plain.astype(np.float64) + z, 0)
    tol = TOLERANCES[np.dtype(case.dtype)]
    assert_close(fused, separate, tol, scale=np.abs(plain) + np.abs(z), what="fused vs separate")


def test_ghost_batches_equal_separate_calls_bit_for_bit():
    """Each ghost batch is normalised exactly as forward normalises that slice on its own."""
    rng = np.random.default_rng(0)
    for shape, axis in (((12, 5, 9, 7), 1), ((12, 6, 6, 4), -1), ((24, 3), 1), ((8, 1, 50), 1)):
        x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
        y, saved = fastbn.forward(x, axis=axis, virtual_batch_size=4)
        for g in range(shape[0] // 4):
            yg, sg = fastbn.forward(x[4 * g : 4 * g + 4], axis=axis)
            assert np.array_equal(y[4 * g : 4 * g + 4], yg)
            assert np.array_equal(saved.mean[g], sg.mean) and np.array_equal(saved.invstd[g], sg.invstd)


def test_renorm_with_unit_limits_is_plain_batch_norm():
    """rmax = 1, dmax = 0 clips r to 1 and d to 0: plain batch norm, bit for bit."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8, 5, 5)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    rm, rv = rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    y1, s1 = fastbn.forward(x, w, b, running_mean=rm.copy(), running_var=rv.copy(), renorm=(1.0, 0.0))
    y2, s2 = fastbn.forward(x, w, b, running_mean=rm.copy(), running_var=rv.copy())
    assert np.array_equal(y1, y2) and np.all(s1.r == 1) and np.all(s1.d == 0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for u, v in zip(fastbn.backward(dy, x, w, s1), fastbn.backward(dy, x, w, s2)):
        assert np.array_equal(u, v)


def test_renorm_uses_running_stats_before_the_update():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 4)) * 2 + 3
    rm, rv = np.zeros(4), np.ones(4)
    _, saved = fastbn.forward(x, running_mean=rm, running_var=rv, momentum=1.0, renorm=(math.inf, math.inf), eps=1e-5)
    mean, var = x.mean(0), x.var(0)
    assert np.allclose(saved.r, np.sqrt(var + 1e-5) / np.sqrt(1 + 1e-5), rtol=1e-12)
    assert np.allclose(saved.d, mean / np.sqrt(1 + 1e-5), rtol=1e-12)
    assert np.allclose(rm, mean) and np.allclose(rv, x.var(0, ddof=1))  # and then they are updated


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_variants_on_the_fused_and_streamed_plans_agree_bit_for_bit(dtype):
    """The fused (cache-resident) and streamed SLAB plans compute the same reductions in the same
    order, and the same coefficients, also with the ReLU mask and the residual: the plan choice
    never changes an answer.  (float64 shows a 1-ulp difference in a coefficient that float32's
    rounding can hide.)  Compared at the kernels' float64 statistics and gradient sums."""
    from fastbn.backends.cpu import ops, plan, views

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 32, 24, 24)) * 3 + 1).astype(dtype)
    z = rng.standard_normal(x.shape).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ones, zeros = np.ones(32, dtype), np.zeros(32, dtype)
    layout, xv = views.channel_view(x, 1)
    zv = views.readonly(views.same_view(layout, z, 1))

    results = []
    for force in ("fused", "streamed"):
        forward_plan = plan.choose("forward_train", layout, xv.shape, xv.itemsize, override={"strategy": force})
        backward_plan = plan.choose(
            "backward_train", layout, xv.shape, xv.itemsize, masked=True, override={"strategy": force}
        )
        assert forward_plan.strategy == backward_plan.strategy == force
        if force == "fused":  # the fused plan exists for this shape without being forced past the budget
            assert plan.slab_group(xv.shape, xv.itemsize, 3, plan.fuse_bytes(plan.machine())) > 0
        y = np.zeros_like(x)
        stats = ops.forward_train_into(forward_plan, xv, ones, zeros, 1e-5, y.reshape(xv.shape), zv, True)
        mv = views.readonly(y.reshape(xv.shape))
        dx, dres = np.zeros_like(x), np.zeros_like(x)
        sums = ops.backward_train_into(
            backward_plan,
            views.readonly(dy.reshape(xv.shape)),
            xv,
            stats[0].astype(dtype),
            stats[2].astype(dtype),
            ones,
            dx.reshape(xv.shape),
            mv,
            dres.reshape(xv.shape),
        )
        results.append((y, dx, dres, *stats[:3], *sums))
    for a, b in zip(*results):
        assert_plans_agree(a, b, dtype)


def test_plan_fuses_long_runs_into_memory_in_use_and_streams_otherwise():
    """The plan heuristic (fastbn.backends.cpu.plan.choose): the fused plan for a channel that fits in
    cache, with runs of at least FUSE_RUN_BYTES, written into memory already in use; the streamed plan
    for a fresh output, for short runs and for statistics alone."""
    from fastbn._layout import SLAB
    from fastbn.backends.cpu import plan

    long_runs = (64, 16, 4096)  # 16 KiB runs of float32, 1 MiB channels
    short_runs = (256, 16, 196)  # 784-byte runs (14 x 14 images)
    chosen = plan.choose("forward_train", SLAB, long_runs, 4, out_fresh=False)
    assert (chosen.strategy, chosen.group) == ("fused", 1)
    assert plan.choose("forward_train", SLAB, long_runs, 4, out_fresh=True).strategy == "streamed"
    assert plan.choose("moments", SLAB, long_runs, 4).strategy == "streamed"
    assert plan.choose("forward_train", SLAB, short_runs, 4, out_fresh=False).strategy == "streamed"


# ------------------------------------------------------------------- fold ---
@st.composite
def layers(draw):
    """(layer_weight, layer_bias or None, axis, dtype): dense (out, in) or conv (out, in, k, k)."""
    dtype = np.dtype(draw(st.sampled_from((np.float16, BFLOAT16, np.float32, np.float64))))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(("dense", "conv", "conv_transpose", "keras_dense")))
    out, inp = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    shape, axis = {
        "dense": ((out, inp), 0),
        "conv": ((out, inp, 3, 3), 0),
        "conv_transpose": ((inp, out, 2, 2), 1),
        "keras_dense": ((inp, out), -1),
    }[kind]
    w = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(out).astype(dtype) if draw(st.booleans()) else None
    return w, bias, axis, dtype, rng


@given(layers(), st.booleans(), st.sampled_from(EPSILONS))
def test_fold_matches_oracle(layer, affine, eps):
    lw, lb, axis, dtype, rng = layer
    channels = lw.shape[axis]
    sd = stats_dtype(dtype)
    rm = rng.standard_normal(channels).astype(sd)
    rv = rng.uniform(0.1, 4.0, channels).astype(sd)
    w = rng.uniform(-2, 2, channels).astype(sd) if affine else None
    b = rng.standard_normal(channels).astype(sd) if affine else None
    fw, fb = fastbn.fold(lw, lb, rm, rv, w, b, eps, axis=axis)
    ew, eb = oracle_fold(
        lw, lb, rm, rv, np.ones(channels) if w is None else w, np.zeros(channels) if b is None else b, eps, axis=axis
    )
    assert fw.dtype == dtype and fw.shape == lw.shape and fb.dtype == dtype and fb.shape == (channels,)
    tol = TOLERANCES[dtype]
    assert_close(fw, ew, tol, scale=np.abs(ew), what="folded weight")
    # folded bias = s (c - mean) + b with s = weight / sqrt(var + eps): each term rounds on its own
    s = np.abs(1.0 if w is None else w.astype(np.float64)) / np.sqrt(rv.astype(np.float64) + eps)
    c = np.zeros(channels) if lb is None else np.abs(lb.astype(np.float64))
    assert_close(fb, eb, tol, scale=s * (c + np.abs(rm)) + (0 if b is None else np.abs(b)), what="folded bias")


def test_folded_dense_layer_equals_layer_then_eval_batch_norm():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 10))
    lw, lb = rng.standard_normal((6, 10)), rng.standard_normal(6)
    rm, rv = rng.standard_normal(6), rng.uniform(0.5, 2, 6)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    y, _ = fastbn.forward(x @ lw.T + lb, w, b, running_mean=rm.copy(), running_var=rv.copy(), training=False)
    fw, fb = fastbn.fold(lw, lb, rm, rv, w, b, 1e-5)
    assert np.allclose(x @ fw.T + fb, y, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ torch ---
def test_relu_residual_matches_torch_autograd():
    """relu(F.batch_norm(x) + z) and its autograd gradients, in float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 6, 5, 5))
    z = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal(x.shape)
    y, saved = fastbn.forward(x, w, b, residual=z, activation="relu")
    dx, dw, db, dz = fastbn.backward(dy, x, w, saved, y=y)
    tx, tz, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, z, w, b))
    ty = torch.relu(torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True) + tz)
    ty.backward(torch.tensor(dy))
    for mine, theirs in ((y, ty), (dx, tx.grad), (dw, tw.grad), (db, tb.grad), (dz, tz.grad)):
        assert np.allclose(mine, theirs.detach().numpy(), rtol=1e-10, atol=1e-10)
