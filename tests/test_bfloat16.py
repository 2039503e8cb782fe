"""bfloat16 input on the CPU (ml_dtypes' dtype, torch's and JAX's bfloat16): every operation against
the float64 oracle, as tests/test_forward.py, test_backward.py and test_fused.py test the other
dtypes; torch's own batch norm on bfloat16 tensors; the kernels' conversion against ml_dtypes, bit
for bit.  Statistics and parameters are float32, as for float16; only the output's rounding is new
(its bound is derived at TOLERANCES in tests/strategies.py).  The CUDA backend's refusal of
bfloat16 is tested under the simulator (tests/cuda/test_cuda_backend.py).

Each new combination of optional operands compiles its kernels once more (seconds each), so the
draws are small and the deterministic tests few."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fused import _ghost_split, _oracle, _run_forward, _y_allowed_scale, fused_options

import fastbn
from fastbn.backends.cpu.loops import cast_to, load
from fastbn.layer import BatchNorm

from oracle import oracle_backward, oracle_backward_extended, oracle_forward, oracle_moments, oracle_normalize
from strategies import (
    BFLOAT16,
    EPSILONS,
    LAYOUTS,
    Tol,
    allowed_error,
    assert_close,
    assert_within,
    backward_scales,
    cases,
    forward_inputs,
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

OUT_TOL = output_tol(BFLOAT16)
ST_TOL = stats_tol(BFLOAT16)  # float32's: statistics of bfloat16 input are float32
F32 = np.dtype(np.float32)
BF16_CASES = dict(dtypes=(BFLOAT16,), max_elems=4000)


# ------------------------------------------------------------- conversion ---
# The kernels' own load and store helpers, in plain loops over int16 bits (how bfloat16 reaches them).
@numba.njit
def _widen(bits, out):
    for i in range(bits.shape[0]):
        out[i] = load(bits[i])


@numba.njit
def _narrow(values, out):
    for i in range(values.shape[0]):
        out[i] = cast_to(out, values[i])


def _bits_to_float32(words):
    return np.asarray(words, np.uint32).view(np.float32)


def test_every_bfloat16_widens_exactly_and_rounds_back_to_itself():
    """All 2^16 bit patterns: widening is ml_dtypes' (exact), and narrowing the result gives the
    same bits back, NaNs included as ml_dtypes' quiet NaN of the same sign."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    wide = np.empty(bits.size, np.float32)
    _widen(bits, wide)
    expected = bits.view(BFLOAT16).astype(np.float32)
    assert wide.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()
    back = np.empty(bits.size, np.int16)
    _narrow(wide, back)
    nan = np.isnan(wide)
    assert np.array_equal(back[~nan], bits[~nan])
    with np.errstate(invalid="ignore"):
        assert back.tobytes() == wide.astype(BFLOAT16).tobytes()
    assert set(back[nan].view(np.uint16).tolist()) == {0x7FC0, 0xFFC0}


def test_rounding_matches_ml_dtypes_bit_for_bit():
    """float32 to bfloat16: round to nearest, ties to even, as ml_dtypes (and torch, but for NaN's
    bits) does: every bfloat16 with each kind of dropped half (0, just below, at and just above
    the tie, all ones), subnormals, overflow to Inf, NaNs of every kind, and random bits."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    special = [
        0x00000000,
        0x80000000,
        0x00000001,
        0x00008000,
        0x00018000,
        0x007FFFFF,
        0x00800000,
        0x3F808000,
        0x3F818000,
        0x7F7F7FFF,
        0x7F7F8000,
        0x7F7FFFFF,
        0xFF7FFFFF,
        0x7F800000,
        0xFF800000,
        0x7F800001,
        0x7F80FFFF,
        0x7FC00000,
        0x7FFFFFFF,
        0xFF800001,
        0xFFFFFFFF,
    ]
    random = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    values = _bits_to_float32(np.concatenate([(high[:, None] | low).ravel(), special, random]))
    got = np.empty(values.size, np.int16)
    _narrow(values, got)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = values.astype(BFLOAT16).view(np.int16)
    wrong = np.flatnonzero(got != expected)
    assert wrong.size == 0, [
        (hex(values.view(np.uint32)[i]), hex(got.view(np.uint16)[i]), hex(expected.view(np.uint16)[i]))
        for i in wrong[:5]
    ]
    # The cases spelled out: a tie rounds to the even neighbour, just past the largest finite
    # value is Inf, and a NaN whose payload lies in the dropped half is still a NaN.
    for word, result in (
        (0x3F808000, 0x3F80),
        (0x3F818000, 0x3F82),
        (0x7F7F7FFF, 0x7F7F),
        (0x7F7F8000, 0x7F80),
        (0x00008000, 0x0000),
        (0x00018000, 0x0002),
        (0x7F800001, 0x7FC0),
        (0xFF800001, 0xFFC0),
    ):
        out = np.empty(1, np.int16)
        _narrow(_bits_to_float32([word]), out)
        assert out.view(np.uint16)[0] == result, hex(word)


# ---------------------------------------------------------------- forward ---
@given(forward_inputs(**BF16_CASES), st.data())
def test_forward_matches_oracle(inp, data):
    """Every option (ReLU, residual, ghost batches, renorm), training and eval, every layout."""
    options = data.draw(fused_options(inp), label="options")
    case, p = inp.case, inp.params
    x_before = case.x.copy()
    y, saved, rm, rv = _run_forward(inp, options)
    o = _oracle(inp, options)
    assert isinstance(y, np.ndarray) and y.dtype == BFLOAT16 and y.shape == case.x.shape
    assert_close(y, o.y, OUT_TOL, scale=_y_allowed_scale(inp, options, o), what="y")
    if options.get("activation") == "relu":
        assert not (y < 0).any()
    assert saved.mean.dtype == F32 and saved.invstd.dtype == F32 and saved.mean.shape == o.mean.shape
    groups = _ghost_split(case.x, options, o)
    scale_mean = np.stack([mean_scale(xg, m, case.axis) for xg, m, _ in groups]).reshape(o.mean.shape)
    assert_close(saved.mean, o.mean, ST_TOL, scale=scale_mean, what="saved.mean")
    if len(groups) == 1:
        assert_close(
            saved.invstd,
            o.invstd,
            ST_TOL,
            scale=invstd_scale(case.x, o.mean, o.invstd, case.axis, ST_TOL),
            what="saved.invstd",
        )
    if o.r is not None:
        k = (np.abs(o.mean) + np.abs(p.running_mean)) * o.invstd
        assert_close(saved.r, o.r, ST_TOL, scale=np.abs(o.r) * (1 + k), what="r")
        assert_close(saved.d, o.d, ST_TOL, scale=1 + np.abs(o.d) + k, what="d")
    if p.running_mean is not None and inp.training:
        assert rm.dtype == F32 and rv.dtype == F32
        m, n = inp.momentum, case.count // len(groups)
        spread = np.stack([mean_scale(xg, mm, case.axis) for xg, mm, _ in groups]).max(0)
        group_var = np.stack(
            [var_scale(xg, mm, 1.0 / inv**2 - inp.eps, case.axis, ST_TOL) for xg, mm, inv in groups]
        ).max(0)
        assert_close(rm, o.running_mean, ST_TOL, scale=np.abs(p.running_mean) + m * spread, what="running_mean")
        assert_close(
            rv, o.running_var, ST_TOL, scale=np.abs(p.running_var) + m * n / (n - 1) * group_var, what="running_var"
        )
    elif p.running_mean is not None:
        assert rm.tobytes() == p.running_mean.tobytes() and rv.tobytes() == p.running_var.tobytes()
    assert np.array_equal(case.x, x_before, equal_nan=True)


@given(cases(**BF16_CASES))
def test_moments_matches_oracle(case):
    mean, var = fastbn.moments(case.x, axis=case.axis)
    o_mean, o_var = oracle_moments(case.x, case.axis)
    assert mean.dtype == F32 and var.dtype == F32 and mean.shape == (case.channels,)
    assert_close(mean, o_mean, ST_TOL, scale=mean_scale(case.x, o_mean, case.axis), what="mean")
    assert_close(var, o_var, ST_TOL, scale=var_scale(case.x, o_mean, o_var, case.axis, ST_TOL), what="var")


@given(cases(min_count=1, **BF16_CASES), st.booleans(), st.sampled_from(EPSILONS))
def test_normalize_matches_oracle(case, affine, eps):
    p = make_params(case, weight=affine, bias=affine)
    y = fastbn.normalize(case.x, p.running_mean, p.running_var, p.weight, p.bias, eps=eps, axis=case.axis)
    expected = oracle_normalize(case.x, p.running_mean, p.running_var, p.weight, p.bias, eps=eps, axis=case.axis)
    assert y.dtype == BFLOAT16 and y.shape == case.x.shape
    invstd = 1.0 / np.sqrt(p.running_var.astype(np.float64) + eps)
    scale = y_scale(case.x, p.running_mean.astype(np.float64), invstd, p.weight, p.bias, case.axis, ST_TOL)
    assert_close(y, expected, OUT_TOL, scale=scale, what="normalize y")


# --------------------------------------------------------------- backward ---
@given(forward_inputs(**BF16_CASES), st.data())
def test_backward_matches_oracle(inp, data):
    """dx, dweight, dbias (and the residual's gradient) after every option of forward."""
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
    dx, dweight, dbias = out[:3]
    g = np.where(np.asarray(y, np.float64) > 0, np.asarray(dy, np.float64), 0.0) if relu else np.asarray(dy, float)
    w = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    w_eff = w if o.r is None else o.r * w
    dx_parts, dw_scale, db_scale = [], 0.0, 0.0
    for (xg, mean, invstd), (gg, _, _) in zip(_ghost_split(case.x, options, o), _ghost_split(g, options, o)):
        s_dx, s_dw, s_db = backward_scales(xg, gg, mean, invstd, w_eff, case.axis, ST_TOL)
        dx_parts.append(s_dx)
        dw_scale, db_scale = dw_scale + s_dw, db_scale + s_db
    if o.r is not None:
        dw_scale = np.abs(o.r) * dw_scale + np.abs(o.d) * db_scale
    assert dx.dtype == BFLOAT16 and dx.shape == case.x.shape
    assert dweight.dtype == F32 and dbias.dtype == F32
    assert_close(dx, e_dx, OUT_TOL, scale=np.concatenate(dx_parts, axis=0), what="dx")
    assert_close(dweight, e_dweight, ST_TOL, scale=dw_scale, what="dweight")
    assert_close(dbias, e_dbias, ST_TOL, scale=db_scale, what="dbias")
    if "residual" in options:
        # the masked dy, exact: a bfloat16 value widened and rounded back
        assert out[3].dtype == BFLOAT16 and np.array_equal(out[3].astype(np.float64), e_dres)


@given(forward_inputs(weight=False, training=True, **BF16_CASES))
def test_dx_sums_to_zero_per_channel(inp):
    """A property the oracle does not decide: with batch statistics and unit weight every channel's
    dx sums to 0, within the sum of the errors allowed to its elements."""
    case, p = inp.case, inp.params
    _, saved = fastbn.forward(case.x, None, p.bias, eps=inp.eps, axis=case.axis)
    dy = like(case, case.rng(2).standard_normal(case.x.shape))
    dx, _, _ = fastbn.backward(dy, case.x, None, saved, axis=case.axis)
    o = oracle_forward(case.x, eps=inp.eps, axis=case.axis)
    dx_scale, _, _ = backward_scales(case.x, dy, o.mean, o.invstd, None, case.axis, ST_TOL)
    axes = tuple(i for i in range(case.x.ndim) if i != case.channel)
    allowed = np.sum(allowed_error(dx, OUT_TOL, dx_scale), axis=axes)
    assert_within(np.sum(dx.astype(np.float64), axis=axes), np.zeros(case.channels), allowed, "sum of dx")


# ---------------------------------------------------- layouts, deterministic ---
# Both kernel layouts and the copies: NCHW (SLAB), NHWC with axis=-1 and a channels-last view
# with axis=1 (ROWS), a transposed and a strided (negative step) view.
LAYOUT_CASES = [
    ((6, 5, 7, 9), 1, ("contiguous", ())),
    ((6, 7, 9, 5), -1, ("contiguous", ())),
    ((6, 5, 7, 9), 1, ("channels_last", ())),
    ((6, 5, 7, 9), 1, ("transposed", (2, 0, 3, 1))),
    ((6, 5, 7, 9), 1, ("strided", (3, -2))),
]
assert {kind for _, _, (kind, _) in LAYOUT_CASES} == set(LAYOUTS)


@pytest.mark.parametrize("shape, axis, layout", LAYOUT_CASES, ids=[c[2][0] + str(c[1]) for c in LAYOUT_CASES])
def test_layouts_train_and_eval(shape, axis, layout):
    rng = np.random.default_rng(3)
    channels = shape[axis]
    x = place(rng.normal(1.0, 3.0, shape), BFLOAT16, layout, axis)
    dy = place(rng.standard_normal(shape), BFLOAT16, layout, axis)
    w, b = rng.uniform(0.5, 2.0, channels).astype(F32), rng.normal(size=channels).astype(F32)
    rm0, rv0 = rng.normal(size=channels).astype(F32), rng.uniform(4.0, 16.0, channels).astype(F32)
    for training in (True, False):
        rm, rv = rm0.copy(), rv0.copy()
        y, saved = fastbn.forward(x, w, b, running_mean=rm, running_var=rv, training=training, axis=axis)
        o = oracle_forward(x, w, b, running_mean=rm0, running_var=rv0, training=training, axis=axis)
        assert y.dtype == BFLOAT16
        if layout[0] in ("contiguous", "channels_last"):  # the kernels' own layouts come back as they went in
            assert y.strides == x.strides
        assert_close(y, o.y, OUT_TOL, scale=y_scale(x, o.mean, o.invstd, w, b, axis, ST_TOL), what=f"y {training}")
        if training:
            assert_close(rm, o.running_mean, ST_TOL, scale=np.abs(rm0) + 1, what="running_mean")
        dx, dweight, dbias = fastbn.backward(dy, x, w, saved, axis=axis)
        e_dx, e_dweight, e_dbias = oracle_backward(dy, x, w, o.mean, o.invstd, o.batch_stats, axis)
        dx_scale, dw_scale, db_scale = backward_scales(x, dy, o.mean, o.invstd, w, axis, ST_TOL)
        assert dx.dtype == BFLOAT16 and dx.strides == y.strides
        assert_close(dx, e_dx, OUT_TOL, scale=dx_scale, what=f"dx {training}")
        assert_close(dweight, e_dweight, ST_TOL, scale=dw_scale, what="dweight")
        assert_close(dbias, e_dbias, ST_TOL, scale=db_scale, what="dbias")


def test_float32_parameters_only_and_dtype_messages_name_bfloat16():
    x = np.ones((4, 3), BFLOAT16)
    with pytest.raises(TypeError, match=r"^weight: expected dtype float32 \(to match the input\), got bfloat16"):
        fastbn.forward(x, np.ones(3, BFLOAT16))
    with pytest.raises(TypeError, match=r"^x: expected dtype float16, bfloat16, float32 or float64, got int16"):
        fastbn.forward(x.view(np.int16))
    with pytest.raises(TypeError, match=r"^dy: expected the dtype of x"):
        fastbn.backward(np.ones((4, 3), np.float16), x, None, fastbn.forward(x)[1])


def test_fold_of_a_bfloat16_layer():
    rng = np.random.default_rng(4)
    lw, lb = rng.standard_normal((4, 3, 2, 2)).astype(BFLOAT16), rng.standard_normal(4).astype(BFLOAT16)
    rm, rv = rng.normal(size=4).astype(F32), rng.uniform(0.5, 2.0, 4).astype(F32)
    fw, fb = fastbn.fold(lw, lb, rm, rv, None, None)
    s = 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
    assert fw.dtype == BFLOAT16 and fb.dtype == BFLOAT16
    expected = lw.astype(np.float64) * s[:, None, None, None]
    assert_close(fw, expected, OUT_TOL, scale=np.abs(expected), what="folded weight")


# ------------------------------------------------------------------ torch ---
torch_formats = pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])


@torch_formats
def test_torch_bfloat16_tensors_are_viewed_not_copied(memory_format):
    torch = pytest.importorskip("torch")
    from fastbn.backends.cpu import alloc, views

    t = torch.randn(2, 3, 4, 5).to(torch.bfloat16, memory_format=getattr(torch, memory_format))
    array = views.to_host(t, "x")
    assert array.dtype == BFLOAT16 and array.ctypes.data == t.data_ptr()
    assert array.strides == tuple(2 * s for s in t.stride())
    assert np.array_equal(array.astype(np.float32), t.float().numpy())
    # an output fastbn allocates goes back as a bfloat16 tensor over the same memory
    out = (
        np.moveaxis(alloc.empty((2, 4, 5, 3), BFLOAT16), -1, 1)
        if memory_format == "channels_last"
        else alloc.empty((2, 3, 4, 5), BFLOAT16)
    )
    restored = views.restorer(t)(out)
    assert restored.dtype == torch.bfloat16 and restored.data_ptr() == out.ctypes.data
    assert restored.stride() == t.stride()


@torch_formats
@pytest.mark.parametrize("training", [True, False])
def test_torch_bfloat16_matches_torch_batch_norm(memory_format, training):
    """fastbn and torch's F.batch_norm on the same bfloat16 tensor with float32 parameters and
    running statistics: each within the derived bound of the float64 oracle (torch computes in float32
    and rounds too), so within twice it of each other; the output is a bfloat16 tensor in the input's
    memory format; running statistics are updated in place like torch's."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    fmt = getattr(torch, memory_format)
    x = torch.from_numpy(rng.normal(2.0, 3.0, (6, 4, 5, 7)).astype(np.float32)).to(torch.bfloat16, memory_format=fmt)
    w, b = torch.from_numpy(rng.uniform(0.5, 2, 4).astype(F32)), torch.from_numpy(rng.normal(size=4).astype(F32))
    rm0, rv0 = torch.from_numpy(rng.normal(size=4).astype(F32)), torch.from_numpy(rng.uniform(4, 9, 4).astype(F32))
    rm, rv, trm, trv = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    y, saved = fastbn.forward(x, w, b, running_mean=rm, running_var=rv, training=training, momentum=0.2)
    expected = F.batch_norm(x, trm, trv, w, b, training=training, momentum=0.2, eps=1e-5)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.stride() == x.stride()
    assert y.is_contiguous(memory_format=fmt) and saved.mean.dtype == F32  # saved stays NumPy

    x64 = x.double().numpy()
    o = oracle_forward(
        x64, w.numpy(), b.numpy(), running_mean=rm0.numpy(), running_var=rv0.numpy(), training=training, momentum=0.2
    )
    allowed = allowed_error(o.y, OUT_TOL, y_scale(x64, o.mean, o.invstd, w.numpy(), b.numpy(), 1, ST_TOL))
    assert_within(y.double().numpy(), o.y, allowed, "fastbn's y vs the oracle")
    assert_within(expected.double().numpy(), o.y, allowed, "torch's y vs the oracle")
    assert_within(y.double().numpy(), expected.double().numpy(), 2 * allowed, "fastbn's y vs torch's")
    for mine, theirs, what in ((rm, trm, "running_mean"), (rv, trv, "running_var")):
        assert_close(
            mine.numpy(), theirs.numpy().astype(np.float64), ST_TOL, scale=np.abs(theirs.numpy()) + 1, what=what
        )

    # backward against torch's autograd on the same tensors
    dy = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)).to(torch.bfloat16, memory_format=fmt)
    dx, dweight, dbias = fastbn.backward(dy, x, w, saved)
    tx, tw, tb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    F.batch_norm(tx, rm0.clone(), rv0.clone(), tw, tb, training=training, eps=1e-5).backward(dy)
    assert dx.dtype == torch.bfloat16 and dx.stride() == x.stride() and dweight.dtype == torch.float32
    e_dx, e_dw, e_db = oracle_backward(dy.double().numpy(), x64, w.numpy(), o.mean, o.invstd, o.batch_stats)
    dx_scale, dw_scale, db_scale = backward_scales(x64, dy.double().numpy(), o.mean, o.invstd, w.numpy(), 1, ST_TOL)
    for got, what in ((dx, "fastbn's dx"), (tx.grad, "torch's dx")):
        assert_close(got.double().numpy(), e_dx, OUT_TOL, scale=dx_scale, what=what)
    for got, theirs, e, scale, what in (
        (dweight, tw.grad, e_dw, dw_scale, "dweight"),
        (dbias, tb.grad, e_db, db_scale, "dbias"),
    ):
        assert_close(got.numpy(), e, ST_TOL, scale=scale, what=what)
        assert_close(theirs.numpy(), e, ST_TOL, scale=scale, what=f"torch's {what}")


def test_torch_bfloat16_statistics_are_refused_with_their_name():
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"^running_mean: expected dtype float32 \(to match the input\), got bfloat16"):
        fastbn.forward(x, running_mean=torch.zeros(3, dtype=torch.bfloat16), running_var=torch.ones(3))


# -------------------------------------------------------------- JAX, layer ---
def test_jax_bfloat16_arrays():
    """A JAX bfloat16 array is ml_dtypes' dtype on the host: fastbn.forward takes it as it is, and
    fastbn.jax.batch_norm runs (and differentiates) it with float32 statistics."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from fastbn.jax import batch_norm

    x_np = np.random.default_rng(6).normal(1.0, 2.0, (8, 3)).astype(BFLOAT16)
    x = jnp.asarray(x_np)
    y, saved = fastbn.forward(x)
    assert isinstance(y, jax.Array) and y.dtype == jnp.bfloat16 and saved.mean.dtype == F32
    o = oracle_forward(x_np)
    assert_close(np.asarray(y), o.y, OUT_TOL, scale=y_scale(x_np, o.mean, o.invstd, None, None, 1, ST_TOL), what="y")
    y2, (mean, _var) = batch_norm(x, running_mean=jnp.zeros(3), running_var=jnp.ones(3))
    assert y2.dtype == jnp.bfloat16 and mean.dtype == F32
    assert np.array_equal(np.asarray(y2), np.asarray(y))
    grad = jax.grad(lambda x: jnp.sum(batch_norm(x)[0].astype(jnp.float32) ** 3))(x)
    assert grad.dtype == jnp.bfloat16 and grad.shape == x.shape


def test_layer_takes_bfloat16_numpy_and_torch_input():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, (16, 4, 3)).astype(BFLOAT16)
    bn = BatchNorm(4)
    y = bn(x)
    o = oracle_forward(x)
    assert y.dtype == BFLOAT16 and bn.running_mean.dtype == F32
    assert_close(y, o.y, OUT_TOL, scale=y_scale(x, o.mean, o.invstd, None, None, 1, ST_TOL), what="layer y")
    dx = bn.backward(np.ones_like(y))
    assert dx.dtype == BFLOAT16 and bn.grad_weight.dtype == F32
    with pytest.raises(ValueError, match=r"^dtype: bfloat16 parameters are not supported"):
        BatchNorm(4, dtype=BFLOAT16)
    with pytest.raises(TypeError, match="takes float16, bfloat16 or float32 input, got int32"):
        bn(x.astype(np.int32))
    torch = pytest.importorskip("torch")
    ty = BatchNorm(4)(torch.from_numpy(x.astype(np.float32)).bfloat16())
    assert ty.dtype == torch.bfloat16 and np.array_equal(ty.float().numpy(), y.astype(np.float32))


def test_output_tolerance_is_the_derived_bound():
    """The tolerance is the rounding bound itself (half a bfloat16 ulp), not a looser number, and it
    is attained: rounding float32 values to bfloat16 costs up to it and never more."""
    assert Tol(rtol=2.0**-8, atol=ST_TOL.atol * (1 + 2.0**-8), floor=2.0**-134) == OUT_TOL
    values = np.random.default_rng(8).uniform(1.0, 2.0, 1 << 16).astype(np.float32)
    error = np.abs(values.astype(BFLOAT16).astype(np.float64) - values) / values
    assert error.max() <= 2.0**-8 and error.max() > 0.99 * 2.0**-8
