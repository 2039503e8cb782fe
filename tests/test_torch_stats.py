"""fastbn.torch.moments and fastbn.torch.normalize against torch's own ops: values, gradients (first and
second order), the custom operators (opcheck, torch.compile, torch.export), broadcast parameter shapes,
weights and masks, dtypes, memory layouts, and errors raised before anything runs.  Skips only when torch
is missing."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import _stats  # noqa: E402

F64 = torch.float64
# Statistics are float32 for float16/bfloat16/float32 input, float64 for float64; outputs round once
# to the input's dtype (float16: 11 bits, bfloat16: 8 bits).
STATS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-12, atol=1e-12)}
OUT_TOL = {
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    F64: dict(rtol=1e-12, atol=1e-12),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, F64]


def stats_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def randn(*shape, dtype=F64, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=F64) * 2 + 1).to(dtype)
    return x.requires_grad_(grad)


def positive(*shape, dtype=F64, seed=1, grad=False):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=generator, dtype=F64) + 0.5).to(dtype)
    return x.requires_grad_(grad)


def weighted_reference(x, w, axes, keepdim=False):
    """tf.nn.weighted_moments written with torch ops, in float64."""
    x, w = x.to(F64), w.to(F64)
    total = (w * torch.ones_like(x)).sum(dim=axes, keepdim=True)
    mean = (w * x).sum(dim=axes, keepdim=True) / total
    var = (w * (x - mean) ** 2).sum(dim=axes, keepdim=True) / total
    if not keepdim:
        mean, var = mean.squeeze(axes), var.squeeze(axes)
    return mean, var


def grads(outputs, inputs, cotangents):
    return torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)


# ------------------------------------------------------------------ moments ---
MOMENTS_CASES = [
    # shape, arguments, reduced dims (torch.var_mean's dim)
    ((6, 3, 4, 5), dict(), (0, 2, 3)),
    ((6, 4, 5, 3), dict(dim=-1), (0, 1, 2)),
    ((6, 4, 5, 3), dict(axes=[0, 1, 2]), (0, 1, 2)),
    ((6, 4, 3), dict(axes=[0]), (0,)),
    ((6, 4, 3), dict(axes=(2, 0)), (0, 2)),
    ((7, 3), dict(axes=1), (1,)),
    ((3, 4, 5), dict(axes=[0, 1, 2]), (0, 1, 2)),
    ((9,), dict(axes=0), (0,)),
]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape, arguments, reduced", MOMENTS_CASES)
def test_moments_match_var_mean_values_and_gradients(shape, arguments, reduced, keepdim):
    for dtype in (torch.float32, F64):
        x = randn(*shape, dtype=dtype, grad=True)
        mean, var = fbt.moments(x, keepdim=keepdim, **arguments)
        x64 = x.detach().to(F64).requires_grad_()
        ref_var, ref_mean = torch.var_mean(x64, dim=reduced, correction=0, keepdim=keepdim)
        assert mean.dtype == var.dtype == stats_dtype(dtype)
        assert mean.shape == var.shape == ref_mean.shape
        torch.testing.assert_close(mean.to(F64), ref_mean, **STATS_TOL[stats_dtype(dtype)])
        torch.testing.assert_close(var.to(F64), ref_var, **STATS_TOL[stats_dtype(dtype)])
        g_mean, g_var = randn(*mean.shape, seed=2), randn(*var.shape, seed=3)
        (dx,) = grads((mean, var), x, (g_mean.to(mean.dtype), g_var.to(var.dtype)))
        (ref_dx,) = grads((ref_mean, ref_var), x64, (g_mean, g_var))
        assert dx.dtype == dtype
        torch.testing.assert_close(dx.to(F64), ref_dx, **STATS_TOL[stats_dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_dtypes(dtype):
    x = randn(8, 3, 5, dtype=dtype, grad=True)
    mean, var = fbt.moments(x, dim=1)
    ref_var, ref_mean = torch.var_mean(x.detach().to(F64), dim=(0, 2), correction=0)
    assert mean.dtype == var.dtype == stats_dtype(dtype)
    torch.testing.assert_close(mean.to(F64), ref_mean, **STATS_TOL[stats_dtype(dtype)])
    torch.testing.assert_close(var.to(F64), ref_var, **STATS_TOL[stats_dtype(dtype)])
    (dx,) = torch.autograd.grad(mean.sum() + var.sum(), x)
    ref_dx = (1 + 2 * (x.detach().to(F64) - ref_mean.reshape(1, 3, 1))) / 40
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.to(F64), ref_dx, **OUT_TOL[dtype])


WEIGHT_CASES = [
    # x shape, arguments, weights shape, reduced dims
    ((5, 3, 4), dict(), (5, 3, 4), (0, 2)),
    ((5, 3, 4), dict(), (5, 1, 4), (0, 2)),
    ((5, 3, 4), dict(dim=1), (3, 1), (0, 2)),
    ((5, 3, 4), dict(axes=[0]), (5, 1, 1), (0,)),
    ((5, 3, 4), dict(axes=[0, 1, 2]), (4,), (0, 1, 2)),
    ((6, 2, 2, 3), dict(dim=-1), (6, 2, 2, 1), (0, 1, 2)),
]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape, arguments, w_shape, reduced", WEIGHT_CASES)
def test_weighted_moments_values_and_gradients(shape, arguments, w_shape, reduced, keepdim):
    x = randn(*shape, grad=True)
    w = positive(*w_shape, seed=4, grad=True)
    mean, var = fbt.moments(x, keepdim=keepdim, weights=w, **arguments)
    x64, w64 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_mean, ref_var = weighted_reference(x64, w64, reduced, keepdim)
    torch.testing.assert_close(mean, ref_mean, **STATS_TOL[F64])
    torch.testing.assert_close(var, ref_var, **STATS_TOL[F64])
    cotangents = (randn(*mean.shape, seed=5), randn(*var.shape, seed=6))
    dx, dw = grads((mean, var), (x, w), cotangents)
    ref_dx, ref_dw = grads((ref_mean, ref_var), (x64, w64), cotangents)
    assert dw.shape == w.shape
    torch.testing.assert_close(dx, ref_dx, **STATS_TOL[F64])
    torch.testing.assert_close(dw, ref_dw, **STATS_TOL[F64])


def test_weighted_moments_reduced_dtypes_and_zero_total_weight():
    x = randn(6, 3, 4, grad=True)
    w = positive(6, 3, 1, seed=4)
    w[:, 1] = 0  # channel 1 has no weight: mean and var 0, and gradients 0 (not NaN)
    w.requires_grad_()
    mean, var = fbt.moments(x, weights=w)
    assert mean[1] == 0 and var[1] == 0
    dx, dw = torch.autograd.grad(mean.sum() + var.sum(), (x, w))
    assert torch.all(dx[:, 1] == 0) and torch.isfinite(dw).all()
    ref_mean, ref_var = weighted_reference(x.detach(), w.detach(), (0, 2))
    keep = [0, 2]
    torch.testing.assert_close(mean[keep], ref_mean[keep], **STATS_TOL[F64])
    torch.testing.assert_close(var[keep], ref_var[keep], **STATS_TOL[F64])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd, wd = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        mean_d, var_d = fbt.moments(xd, weights=wd)
        ref_mean_d, ref_var_d = weighted_reference(xd.detach(), wd.detach(), (0, 2))
        assert mean_d.dtype == torch.float32
        torch.testing.assert_close(mean_d[keep].to(F64), ref_mean_d[keep], **STATS_TOL[torch.float32])
        torch.testing.assert_close(var_d[keep].to(F64), ref_var_d[keep], **STATS_TOL[torch.float32])
        dxd, dwd = torch.autograd.grad(mean_d.sum() + var_d.sum(), (xd, wd))
        assert dxd.dtype == dwd.dtype == dtype and dwd.shape == wd.shape


def masked_reference(x, mask):
    """Per-channel statistics over the True positions of a (N, L) mask of (N, C, L) input, by selection."""
    selected = x.to(F64).transpose(0, 1)[:, mask]  # (C, number of True positions)
    var, mean = torch.var_mean(selected, dim=1, correction=0)
    return mean, var


def test_masks_channel_form_and_broadcast_form():
    x = randn(6, 3, 5, grad=True)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(7)) > 0.4
    mean, var = fbt.moments(x, mask=mask)  # Keras's form: input's shape without the channel dimension
    ref_mean, ref_var = masked_reference(x, mask)
    torch.testing.assert_close(mean, ref_mean, **STATS_TOL[F64])
    torch.testing.assert_close(var, ref_var, **STATS_TOL[F64])
    # The same mask broadcastable to the input, over named axes.
    mean_b, var_b = fbt.moments(x, axes=(0, 2), keepdim=True, mask=mask.unsqueeze(1))
    torch.testing.assert_close(mean_b.reshape(3), ref_mean, **STATS_TOL[F64])
    torch.testing.assert_close(var_b.reshape(3), ref_var, **STATS_TOL[F64])
    # A per-sample mask (N, 1, 1): statistics of the kept samples only.
    rows = torch.tensor([True, False, True, True, False, True])
    mean_r, var_r = fbt.moments(x, mask=rows.reshape(6, 1, 1))
    ref_var_r, ref_mean_r = torch.var_mean(x.detach()[rows], dim=(0, 2), correction=0)
    torch.testing.assert_close(mean_r, ref_mean_r, **STATS_TOL[F64])
    torch.testing.assert_close(var_r, ref_var_r, **STATS_TOL[F64])
    (dx,) = torch.autograd.grad(mean_r.sum(), x)
    assert torch.all(dx[~rows] == 0) and torch.all(dx[rows] > 0)


def test_empty_batch():
    x = torch.empty(0, 3, 4, requires_grad=True)
    mean, var = fbt.moments(x)
    assert mean.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()
    y = fbt.normalize(x, torch.zeros(3), torch.ones(3))
    assert y.shape == x.shape
    w = torch.ones(3, requires_grad=True)
    (dw,) = torch.autograd.grad(fbt.normalize(x, torch.zeros(3), torch.ones(3), w).sum(), w)
    assert torch.equal(dw, torch.zeros(3))


# ---------------------------------------------------------------- normalize ---
def normalize_reference(x, mean, var, weight, bias, eps, dim):
    """tf.nn.batch_normalization written with torch ops in float64, parameters broadcast along ``dim``."""
    shape = [1] * x.dim()
    shape[dim] = -1

    def along(p):
        if p is None:
            return None
        p = p.to(F64)
        return p.reshape(shape) if p.dim() <= 1 and p.numel() > 1 else p

    y = (x.to(F64) - along(mean)) / torch.sqrt(along(var) + eps)
    if weight is not None:
        y = y * along(weight)
    if bias is not None:
        y = y + along(bias)
    return y


NORMALIZE_CASES = [
    # x shape, dim given, parameter shapes (mean, var, weight, bias), parameter dtypes
    ((4, 3, 5, 2), None, [(3,), (3,), (3,), (3,)], [F64] * 4),
    ((4, 3, 5, 2), None, [(1, 3, 1, 1), (1, 3, 1, 1), (1, 3, 1, 1), (1, 3, 1, 1)], [F64] * 4),
    ((4, 5, 2, 3), None, [(1, 1, 1, 3), (1, 1, 1, 3), (1, 1, 1, 3), (1, 1, 1, 3)], [F64] * 4),
    ((4, 5, 2, 3), -1, [(3,), (3,), (3,), None], [F64] * 4),
    ((4, 3, 5, 2), None, [(1, 3, 1, 1), (3,), (3, 1, 1), ()], [F64, torch.float32, torch.float16, F64]),
    ((6, 3), None, [(1, 3), (3,), None, (1,)], [torch.float32, F64, F64, torch.bfloat16]),
]


@pytest.mark.parametrize("shape, dim, p_shapes, p_dtypes", NORMALIZE_CASES)
def test_normalize_broadcast_parameters_values_and_gradients(shape, dim, p_shapes, p_dtypes):
    channel = dim if dim is not None else (3 if p_shapes[0] == (1, 1, 1, 3) else 1)
    x = randn(*shape, grad=True)
    params = []
    for i, (p_shape, p_dtype) in enumerate(zip(p_shapes, p_dtypes)):
        make = positive if i == 1 else randn
        params.append(None if p_shape is None else make(*p_shape, seed=10 + i).to(p_dtype).requires_grad_())
    y = fbt.normalize(x, *params, eps=1e-3, dim=dim)
    leaves = [x.detach().clone().requires_grad_()] + [
        None if p is None else p.detach().clone().requires_grad_() for p in params
    ]
    ref = normalize_reference(*leaves, 1e-3, channel % x.dim())
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, **OUT_TOL[F64])
    inputs = [t for t in [x, *params] if t is not None]
    ref_inputs = [t for t in leaves if t is not None]
    cotangent = randn(*shape, seed=20)
    ours, theirs = grads(y, inputs, cotangent), grads(ref, ref_inputs, cotangent)
    for given, got, expected in zip(inputs, ours, theirs):
        assert got.shape == given.shape and got.dtype == given.dtype
        tol = OUT_TOL[given.dtype] if given.dtype != F64 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got, expected.to(given.dtype), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_dtypes(dtype):
    x = randn(8, 3, 5, dtype=dtype, grad=True)
    mean, var = randn(3, seed=1), positive(3, seed=2)
    weight = randn(3, seed=3, dtype=stats_dtype(dtype), grad=True)
    y = fbt.normalize(x, mean, var, weight, eps=1e-5)
    ref = normalize_reference(x.detach(), mean, var, weight.detach(), None, 1e-5, 1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.to(F64), ref, **OUT_TOL[dtype])
    dx, dw = torch.autograd.grad(y.to(F64).sum(), (x, weight))
    s = (var + 1e-5).rsqrt()
    assert dx.dtype == dtype and dw.dtype == stats_dtype(dtype)
    torch.testing.assert_close(
        dx.to(F64), (weight.detach().to(F64) * s).reshape(1, 3, 1).expand(8, 3, 5), **OUT_TOL[dtype]
    )
    ref_dw = ((x.detach().to(F64) - mean.reshape(1, 3, 1)) * s.reshape(1, 3, 1)).sum((0, 2))
    torch.testing.assert_close(dw.to(F64), ref_dw, rtol=1e-4 if dtype != F64 else 1e-12, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_keepdim_moments_feed_normalize_as_batch_norm(layout):
    """normalize(x, *moments(x, keepdim=True)) with affine parameters is training-mode batch norm."""
    x_nchw = randn(4, 3, 5, 2, dtype=torch.float32, grad=True)
    weight, bias = randn(3, seed=1, dtype=torch.float32, grad=True), randn(3, seed=2, dtype=torch.float32, grad=True)
    if layout == "nchw":
        x = x_nchw
        mean, var = fbt.moments(x, keepdim=True)
        assert mean.shape == (1, 3, 1, 1)
        y = fbt.normalize(x, mean, var, weight.reshape(1, 3, 1, 1), bias)
    else:
        x = x_nchw.permute(0, 2, 3, 1)  # a channels-last view: (N, H, W, C)
        mean, var = fbt.moments(x, axes=[0, 1, 2], keepdim=True)
        assert mean.shape == (1, 1, 1, 3)
        y = fbt.normalize(x, mean, var, weight.reshape(1, 1, 1, 3), bias.reshape(1, 1, 1, 3)).permute(0, 3, 1, 2)
    ref = F.batch_norm(x_nchw, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    cotangent = randn(4, 3, 5, 2, dtype=torch.float32, seed=3)
    torch.testing.assert_close(
        grads(y, (x_nchw, weight, bias), cotangent), grads(ref, (x_nchw, weight, bias), cotangent), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_masked_batch_norm_composed_matches_torch(dtype):
    """normalize(x, *moments(x, mask=m)): statistics of the unmasked positions, applied everywhere."""
    x = randn(6, 3, 5, dtype=dtype, grad=True)
    weight, bias = randn(3, seed=1, dtype=dtype, grad=True), randn(3, seed=2, dtype=dtype, grad=True)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(8)) > 0.3
    y = fbt.normalize(x, *fbt.moments(x, mask=mask), weight, bias, eps=1e-3)
    # Reference: masked statistics by selecting positions, then the formula over every position.
    x64, w64, b64 = (t.detach().to(F64).requires_grad_() for t in (x, weight, bias))
    selected = x64.transpose(0, 1)[:, mask]
    var, mean = torch.var_mean(selected, dim=1, correction=0)
    ref = normalize_reference(x64, mean, var, w64, b64, 1e-3, 1)
    tol = OUT_TOL[dtype] if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.to(F64), ref, **tol)
    cotangent = randn(6, 3, 5, seed=4)
    ours = grads(y, (x, weight, bias), cotangent.to(dtype))
    theirs = grads(ref, (x64, w64, b64), cotangent)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got.to(F64), expected, **tol)
    # Masked-out positions still get gradient (through the output), but none through the statistics.
    assert torch.all(ours[0].transpose(0, 1)[:, ~mask] != 0)


def test_gradcheck_and_gradgradcheck_float64():
    x = randn(3, 2, 4, grad=True)
    w = positive(3, 1, 4, seed=2, grad=True)
    mean, var = randn(1, 2, 1, seed=3, grad=True), positive(2, seed=4, grad=True)
    weight, bias = randn(2, 1, seed=5, grad=True), randn(1, 2, 1, seed=6, grad=True)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    checks = [
        (lambda x: fbt.moments(x), (x,)),
        (lambda x: fbt.moments(x, axes=[0], keepdim=True), (x,)),
        (lambda x, w: fbt.moments(x, weights=w), (x, w)),
        (lambda x, w: fbt.moments(x, axes=[0, 2], weights=w), (x, w)),
        (lambda x, *p: fbt.normalize(x, *p, eps=1e-2), (x, mean, var, weight, bias)),
        (lambda x: fbt.normalize(x, *fbt.moments(x, mask=mask)), (x,)),
        (lambda x, w, b: fbt.normalize(x, *fbt.moments(x, keepdim=True, mask=mask), w, b), (x, weight, bias)),
    ]
    for function, inputs in checks:
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


# ---------------------------------------------------------------- operators ---
def test_opcheck():
    x = randn(4, 3, 5, dtype=torch.float32, grad=True)
    w = positive(4, 1, 5, dtype=torch.float32, grad=True)
    mask = torch.rand(4, 1, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    mean, var = randn(3, dtype=torch.float32, grad=True), positive(3, dtype=torch.float32, grad=True)
    weight = randn(3, dtype=torch.float32, seed=2, grad=True)
    x_t = x.transpose(1, 2)  # a transposed view: fastbn writes C order, restrided to empty_like(x_t)
    p5 = [randn(5, dtype=torch.float32, seed=i, grad=True) for i in (4, 5, 6)]
    calls = [
        (_stats.moments_op, (x, [0], True, w, None)),
        (_stats.moments_op, (x, [0, 2], False, None, mask)),
        (_stats.normalize_op, (x_t, p5[0], positive(5, dtype=torch.float32, grad=True), p5[1], p5[2], 1e-3, 1)),
        (_stats.normalize_backward_op, (randn(4, 3, 5, dtype=torch.float32, grad=True), x, mean, var, weight, 1)),
    ]
    for op, args in calls:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_compile_fullgraph_forward_and_backward():
    def fn(x, w, weight, bias):
        mean, var = fbt.moments(x, axes=[0, 2], keepdim=True, weights=w)
        return fbt.normalize(x, mean, var, weight, bias.reshape(1, 3, 1))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (4, 6):
        args = (
            randn(n, 3, 5, dtype=torch.float32, grad=True),
            positive(n, 1, 5, dtype=torch.float32, grad=True),
            randn(3, dtype=torch.float32, seed=2, grad=True),
            randn(3, dtype=torch.float32, seed=3, grad=True),
        )
        y, y_eager = compiled(*args), fn(*args)
        torch.testing.assert_close(y, y_eager)
        cotangent = randn(n, 3, 5, dtype=torch.float32, seed=4)
        torch.testing.assert_close(grads(y, args, cotangent), grads(y_eager, args, cotangent))


def test_export_keeps_the_operators():
    class Model(torch.nn.Module):
        def forward(self, x):
            return fbt.normalize(x, *fbt.moments(x, axes=[0, 1, 2], keepdim=True))

    x = randn(2, 3, 4, 5, dtype=torch.float32)
    exported = torch.export.export(Model(), (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"fastbn.moments.default", "fastbn.normalize.default"} <= targets
    torch.testing.assert_close(exported.module()(x), Model()(x))


def test_torch_func_grad_jacrev_and_vmap():
    x, w = randn(2, 3, 4), positive(2, 1, 4, seed=2)
    weight, bias = randn(3, seed=3), randn(1, 3, 1, seed=4)

    def loss(x, w, weight, bias):
        y = fbt.normalize(x, *fbt.moments(x, weights=w), weight, bias, eps=1e-2)
        return (y * y.detach().sin()).sum() + fbt.moments(x, axes=[0])[1].sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, weight, bias)]
    expected = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    for got, want in zip(torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, w, weight, bias), expected):
        torch.testing.assert_close(got, want, **STATS_TOL[F64])
    # Second order under torch.func (reverse over reverse) against autograd's double backward.
    hessian = torch.func.jacrev(torch.func.jacrev(loss))(x, w, weight, bias)
    rows = [torch.autograd.grad(g, leaves[0], retain_graph=True)[0] for g in expected[0].reshape(-1)]
    torch.testing.assert_close(hessian, torch.stack(rows).reshape(2, 3, 4, 2, 3, 4), **STATS_TOL[F64])
    # vmap: a batch of independent calls, batched inputs or batched weights.
    xb, wb = randn(3, 2, 3, 4, seed=5), positive(3, 2, 1, 4, seed=6)
    mean, var = torch.func.vmap(lambda x, w: fbt.moments(x, weights=w))(xb, wb)
    for i in range(3):
        ref_mean, ref_var = weighted_reference(xb[i], wb[i], (0, 2))
        torch.testing.assert_close(mean[i], ref_mean, **STATS_TOL[F64])
        torch.testing.assert_close(var[i], ref_var, **STATS_TOL[F64])
    y = torch.func.vmap(lambda w: fbt.normalize(x, *fbt.moments(x, weights=w), weight), in_dims=(0,))(wb)
    for i in range(3):
        torch.testing.assert_close(y[i], fbt.normalize(x, *fbt.moments(x, weights=wb[i]), weight), **STATS_TOL[F64])


def test_cpu_tensors_reach_fastbn_without_copies_and_keep_their_layout(monkeypatch):
    seen = []
    for name in ("moments", "normalize", "backward"):
        original = getattr(fastbn, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen.append(args[1] if _name == "backward" else args[0])  # backward(dy, x, ...): its x
            return _original(*args, **kwargs)

        monkeypatch.setattr(fastbn, name, spy)
    base = randn(4, 3, 5, 6, dtype=torch.float32)
    for x, dim in ((base, 1), (base.to(memory_format=torch.channels_last), 1), (base.permute(0, 2, 3, 1), 3)):
        x = x.detach().requires_grad_()
        seen.clear()
        y = fbt.normalize(x, *fbt.moments(x, dim=dim), dim=dim)
        y.backward(torch.ones_like(y))
        assert len(seen) == 3  # moments, normalize, and the backward's per-channel sums
        assert all(t.data_ptr() == x.data_ptr() and t.stride() == x.stride() for t in seen)
        assert y.stride() == torch.empty_like(x).stride() and x.grad.stride() == torch.empty_like(x).stride()


# ------------------------------------------------------------------- errors ---
def _x():
    return randn(4, 3, 5, dtype=torch.float32)


ERRORS = [
    # function, arguments, keywords, exception, message start
    (fbt.moments, ([1.0, 2.0],), {}, fbt.BatchNormTypeError, "input"),
    (fbt.moments, (torch.ones(4, 3, dtype=torch.int64),), {}, fbt.BatchNormTypeError, "input"),
    (fbt.moments, (_x(), 1), dict(axes=0), fbt.BatchNormError, "dim"),
    (fbt.moments, (_x(), 3), {}, IndexError, "dim: Dimension out of range"),
    (fbt.moments, (_x(),), dict(axes=[0, -3]), fbt.BatchNormError, "axes: dim 0 appears multiple times"),
    (fbt.moments, (_x(),), dict(axes=[]), fbt.BatchNormError, "axes"),
    (fbt.moments, (_x(),), dict(axes="0"), fbt.BatchNormTypeError, "axes"),
    (fbt.moments, (_x(),), dict(keepdim=1), fbt.BatchNormTypeError, "keepdim"),
    (
        fbt.moments,
        (_x(),),
        dict(weights=torch.ones(4, 3, 5), mask=torch.ones(4, 5, dtype=torch.bool)),
        ValueError,
        "mask",
    ),
    (fbt.moments, (_x(),), dict(weights=torch.ones(2, 3, 5)), fbt.BatchNormError, "weights"),
    (fbt.moments, (_x(),), dict(weights=torch.ones(4, 3, 5, dtype=torch.int32)), fbt.BatchNormTypeError, "weights"),
    (fbt.moments, (_x(),), dict(weights=torch.ones(4, 3, 5, device="meta")), RuntimeError, "weights: is on meta"),
    (fbt.moments, (_x(),), dict(mask=torch.ones(4, 5)), TypeError, "mask"),
    (fbt.moments, (_x(),), dict(mask=torch.ones(4, 3, dtype=torch.bool)), fbt.BatchNormError, "mask"),
    (fbt.moments, (_x(),), dict(axes=0, mask=torch.ones(3, 4, dtype=torch.bool)), fbt.BatchNormError, "mask"),
    (fbt.normalize, (_x(), torch.zeros(4), torch.ones(3)), {}, fbt.BatchNormError, "mean"),
    (fbt.normalize, (_x(), torch.zeros(1, 3, 5), torch.ones(3)), {}, fbt.BatchNormError, "mean"),
    (fbt.normalize, (_x(), torch.zeros(1, 1, 3, 1), torch.ones(3)), {}, fbt.BatchNormError, "mean"),
    (fbt.normalize, (_x(), torch.zeros(3), None), {}, fbt.BatchNormTypeError, "var"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.int64)), {}, TypeError, "weight"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3), None, torch.ones(5)), {}, fbt.BatchNormError, "bias"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3)), dict(dim=2), fbt.BatchNormError, "mean"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3)), dict(dim=-4), IndexError, "dim"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3)), dict(eps=0.0), fbt.BatchNormError, "eps"),
    (fbt.normalize, (_x(), torch.zeros(3), torch.ones(3)), dict(eps="1e-5"), fbt.BatchNormTypeError, "eps"),
    (fbt.normalize, (torch.ones(3), torch.zeros(3), torch.ones(3)), {}, fbt.BatchNormError, "input"),
    (fbt.normalize, (_x(), torch.zeros(3, device="meta"), torch.ones(3)), {}, fbt.BatchNormError, "mean: is on meta"),
]


@pytest.mark.parametrize("function, args, kwargs, error, message", ERRORS)
def test_errors_raised_before_anything_runs(monkeypatch, function, args, kwargs, error, message):
    def never(*_args, **_kwargs):
        raise AssertionError("an operator ran before the arguments were checked")

    for name in ("moments_op", "normalize_op", "normalize_backward_op"):
        monkeypatch.setattr(_stats, name, never)
    with pytest.raises(error, match="^" + re.escape(message)) as info:
        function(*args, **kwargs)
    # Both fastbn's type (ValueError, TypeError) and torch's (RuntimeError; IndexError for a dimension).
    assert isinstance(info.value, (ValueError, TypeError)) and isinstance(info.value, (RuntimeError, IndexError))


def test_value_errors_from_fastbn_before_its_kernels():
    x = _x()
    with pytest.raises(fbt.BatchNormError, match=r"^weights: expected finite non-negative"):
        fbt.moments(x, weights=-torch.ones(4, 1, 5))
    with pytest.raises(fbt.BatchNormError, match=r"^var"):
        fbt.normalize(x, torch.zeros(3), -torch.ones(3))
