"""fastbn.torch as a drop-in for torch's batch norm, checked against torch itself.

The custom operators (opcheck), torch.compile (fullgraph, inductor, dynamic
shapes), torch.export, torch.func (vmap, jacrev, jvp, hessian), double
backward and forward-mode AD, torch's own semantics (empty batches, any
momentum, eps=0 in eval, its exception types and messages), bfloat16 and
autocast, the fused forms, revert, and fastbn.forward refusing a tensor that
requires grad.  Compilation is the cost here: the inductor runs are few.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import _ops  # noqa: E402

# float64: the formulas agree to rounding; float32: a few ulps through reductions of <= 1e3 values.
F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, dtype=torch.float64, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1).to(dtype)
    return tensor.requires_grad_(grad)


def running(channels, dtype=torch.float64, seed=5):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype)
    var = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    return mean, var


# ------------------------------------------------------------- operators ---
OPCHECK_OPTIONS = [
    # training, relu, residual, virtual_batch_size, renorm, running
    (True, False, False, None, None, True),
    (False, True, True, None, None, True),
    (True, True, True, 2, None, False),
    (True, False, False, None, (2.0, 1.0), True),
]


@pytest.mark.parametrize("training, relu, residual, vbs, renorm, has_running", OPCHECK_OPTIONS)
def test_opcheck(training, relu, residual, vbs, renorm, has_running):
    x = randn(4, 3, 2, dtype=torch.float32, grad=True)
    weight = randn(3, dtype=torch.float32, seed=1, grad=True)
    z = randn(4, 3, 2, dtype=torch.float32, seed=2, grad=True) if residual else None
    rm, rv = running(3, torch.float32) if has_running else (None, None)
    rmax, dmax = renorm if renorm else (None, None)
    args = (x, weight, None, rm, rv, z, training, 0.1, 1e-5, relu, vbs, rmax, dmax)
    result = torch.library.opcheck(_ops.forward_op, args)
    assert set(result.values()) == {"SUCCESS"}, result
    y, mean, invstd, r, d, _, _ = _ops.forward_op(*args)
    batch_stats = training or rm is None
    backward_args = (
        torch.randn_like(y),
        x.detach(),
        weight.detach(),
        mean,
        invstd,
        r,
        d,
        y if relu else None,
        batch_stats,
        residual,
        vbs,
        1e-5,
    )
    result = torch.library.opcheck(_ops.backward_op, backward_args)
    assert set(result.values()) == {"SUCCESS"}, result


# -------------------------------------------------------------- autograd ---
AUTOGRAD_CASES = [({}, (4, 3, 2)), (dict(activation="relu"), (4, 3, 2)), (dict(virtual_batch_size=2), (4, 3))]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options, shape", AUTOGRAD_CASES)
def test_gradcheck_gradgradcheck_and_forward_ad(training, options, shape):
    rm, rv = running(3)
    x, weight, bias = randn(*shape, grad=True), randn(3, seed=1, grad=True), randn(3, seed=2, grad=True)
    args = (x, weight, bias)
    if options.get("activation"):
        args += (randn(*shape, seed=3, grad=True),)

    def fn(x, weight, bias, z=None):
        return fbt.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5, residual=z, **options)

    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True)


def test_second_derivatives_match_torch():
    x, weight = randn(5, 3, 2), randn(3, seed=1)
    rm, rv = running(3)
    for training in (True, False):

        def ours(v, w):
            return fbt.batch_norm(v, rm, rv, w, None, training, 0.0).pow(3).sum()  # noqa: B023 - called within this iteration

        def theirs(v, w):
            return F.batch_norm(v, rm, rv, w, None, training, 0.0).pow(3).sum()  # noqa: B023 - called within this iteration

        for transform in (torch.func.hessian, lambda f: torch.func.jacrev(torch.func.jacrev(f))):
            torch.testing.assert_close(transform(ours)(x, weight), transform(theirs)(x, weight), **F64)
        # Double backward through torch.autograd.grad, the weight's too.
        v, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        (gv,) = torch.autograd.grad(ours(v, w), v, create_graph=True)
        expected = torch.autograd.grad(torch.autograd.grad(theirs(v, w), v, create_graph=True)[0].sum(), (v, w))
        torch.testing.assert_close(torch.autograd.grad(gv.sum(), (v, w)), expected, **F64)


def test_renorm_gradient_treats_r_and_d_as_constants():
    # Ioffe (2017): r and d are constants for the gradient; written here with torch operations.
    x, weight = randn(6, 3, 2, grad=True), randn(3, seed=1, grad=True)
    rm, rv = running(3)
    y = fbt.batch_norm(x, rm.clone(), rv.clone(), weight, None, True, 0.1, 1e-5, renorm=(1.5, 0.5))
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0, keepdim=True)
    sigma = torch.sqrt(var + 1e-5)
    r = torch.clamp(sigma.detach() / torch.sqrt(rv + 1e-5).view(1, 3, 1), 1 / 1.5, 1.5)
    d = torch.clamp((mean.detach() - rm.view(1, 3, 1)) / torch.sqrt(rv + 1e-5).view(1, 3, 1), -0.5, 0.5)
    expected = ((x - mean) / sigma * r + d) * weight.view(1, 3, 1)
    torch.testing.assert_close(y, expected, **F64)
    dy = randn(6, 3, 2, seed=4)
    torch.testing.assert_close(
        torch.autograd.grad(y, (x, weight), dy), torch.autograd.grad(expected, (x, weight), dy), **F64
    )


@pytest.mark.parametrize("training", [True, False])
def test_jvp_matches_torch(training):
    x, tx = randn(6, 3, 4), randn(6, 3, 4, seed=1)
    weight, tw = randn(3, seed=2), randn(3, seed=3)
    rm, rv = running(3)
    ours = torch.func.jvp(
        lambda v, w: fbt.batch_norm(v, rm.clone(), rv.clone(), w, None, training), (x, weight), (tx, tw)
    )
    theirs = torch.func.jvp(
        lambda v, w: F.batch_norm(v, rm.clone(), rv.clone(), w, None, training), (x, weight), (tx, tw)
    )
    torch.testing.assert_close(ours, theirs, **F64)
    expected = torch.func.jvp(lambda v: F.batch_norm(v, rm.clone(), rv.clone(), weight, None, training), (x,), (tx,))
    with fwAD.dual_level():
        y = fbt.batch_norm(fwAD.make_dual(x, tx), rm.clone(), rv.clone(), weight, None, training)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, expected[1], **F64)


def test_vmap_is_a_batch_of_batch_norms():
    xs = randn(5, 4, 3, 2)
    for options in ({}, dict(virtual_batch_size=2), dict(activation="relu")):
        got = torch.func.vmap(lambda v: fbt.batch_norm(v, None, None, training=True, **options))(xs)  # noqa: B023 - called within this iteration
        expected = torch.stack([fbt.batch_norm(v, None, None, training=True, **options) for v in xs])
        torch.testing.assert_close(got, expected, **F64)
    # Batched running statistics are updated, each its own; unbatched ones cannot be (as torch).
    rms, rvs = torch.zeros(5, 3, dtype=torch.float64), torch.ones(5, 3, dtype=torch.float64)
    torch.func.vmap(lambda v, m, s: fbt.batch_norm(v, m, s, training=True))(xs, rms, rvs)
    for i in range(5):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        F.batch_norm(xs[i], rm, rv, training=True)
        torch.testing.assert_close((rms[i], rvs[i]), (rm, rv), **F64)
    rm, rv = running(3)
    for fn in (F.batch_norm, fbt.batch_norm):
        with pytest.raises(RuntimeError):
            torch.func.vmap(lambda v: fn(v, rm, rv, training=True))(xs)  # noqa: B023 - called within this iteration
    # Eval with shared running statistics, and jacrev (a vmap over the backward).
    got = torch.func.vmap(lambda v: fbt.batch_norm(v, rm, rv, training=False))(xs)
    torch.testing.assert_close(got, torch.stack([F.batch_norm(v, rm, rv, training=False) for v in xs]), **F64)
    x = xs[0]
    torch.testing.assert_close(
        torch.func.jacrev(lambda v: fbt.batch_norm(v, None, None, training=True))(x),
        torch.func.jacrev(lambda v: F.batch_norm(v, None, None, training=True))(x),
        **F64,
    )
    grads = torch.func.vmap(torch.func.grad(lambda v: fbt.batch_norm(v, None, None, training=True).pow(3).sum()))(xs)
    expected = torch.func.vmap(torch.func.grad(lambda v: F.batch_norm(v, None, None, training=True).pow(3).sum()))(xs)
    torch.testing.assert_close(grads, expected, **F64)


def test_vjp_of_a_vmap_updates_batched_running_statistics_captured_from_outside():
    """functorch's vjpvmap check: a vjp around a vmap of training calls whose (batched) running statistics
    come from outside the vjp.  torch updates them below the transforms; so must fastbn (its write was a
    copy_ that the grad transform refused as a mutation of a captured tensor)."""
    xs, weight, bias = randn(3, 4, 5), randn(5), randn(5)
    results = []
    for fn in (F.batch_norm, fbt.batch_norm):
        rms, rvs = torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)

        def batched(x, w, b, fn=fn, rms=rms, rvs=rvs):
            return torch.func.vmap(lambda v, m, s: fn(v, m, s, w, b, True, 0.1, 1e-5))(x, rms, rvs)

        out, pullback = torch.func.vjp(batched, xs, weight, bias)
        grads = pullback(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
        results.append((out, *grads, rms, rvs))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **F64)


def test_a_copy_on_write_input_read_again_in_backward_stays_valid():
    """fastbn reads a copy-on-write input without copying it and keeps that view for backward; the view
    holds the shared memory itself.  Asking the caller's tensor for writable memory (data_ptr) gives
    that tensor a copy of its own; with the other owner gone and its memory reused, backward must
    still read the input's values."""
    torch.manual_seed(0)
    source = torch.randn(64, 8)
    x, weight, grad = torch._lazy_clone(source).requires_grad_(), torch.rand(8, requires_grad=True), torch.randn(64, 8)
    out = fbt.batch_norm(x, None, None, weight, None, training=True)
    x.data_ptr()
    del source
    reused = [torch.full((64, 8), 1e6) for _ in range(8)]
    got = torch.autograd.grad(out, (x, weight), grad)
    x_plain = x.detach().clone().requires_grad_()
    expected = torch.autograd.grad(
        F.batch_norm(x_plain, None, None, weight, None, training=True), (x_plain, weight), grad
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all((t == 1e6).all() for t in reused)


def test_negated_and_copy_on_write_running_statistics_in_eval_as_torch():
    """Eval only reads the running statistics: a lazily negated view of them (torch._neg_view), copy-on-
    write or not, gives torch's result (its values, not its raw memory)."""
    x = torch.randn(6, 3, 4)
    for cow in (False, True):
        stats = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5])]
        if cow:
            stats = [torch._lazy_clone(t) for t in stats]
        mean = torch._neg_view(stats[0])
        torch.testing.assert_close(
            fbt.batch_norm(x, mean, stats[1], training=False), F.batch_norm(x, mean, stats[1], training=False)
        )


def test_a_sparse_input_is_refused_with_a_type_error_naming_it():
    sparse = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match=r"^x: a torch tensor of layout torch.sparse_coo; fastbn takes dense"):
        fastbn.forward(sparse)
    with pytest.raises(TypeError, match=r"^x: "):
        fbt.batch_norm(sparse, None, None, training=True)


# ---------------------------------------------------------- torch's rules ---
def test_empty_batch_as_torch():
    for training in (True, False):
        results = []
        for fn in (F.batch_norm, fbt.batch_norm):
            rm, rv = running(3, torch.float32)
            x = torch.empty(0, 3, 4, requires_grad=True)
            w = torch.ones(3, requires_grad=True)
            y = fn(x, rm, rv, w, None, training)
            y.sum().backward()
            results.append((y.shape, x.grad.shape, w.grad, rm, rv))
        assert results[0][:2] == results[1][:2]
        torch.testing.assert_close(results[1][2:], results[0][2:])
    ours, theirs = fbt.BatchNorm2d(3), nn.BatchNorm2d(3)
    for module in (ours, theirs):
        assert module(torch.empty(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_momentum_outside_unit_interval_and_zero_eps_in_eval_as_torch():
    x = randn(8, 3, dtype=torch.float32)
    for momentum in (2.5, -0.5):
        states = []
        for fn in (F.batch_norm, fbt.batch_norm):
            rm, rv = running(3, torch.float32)
            states.append((fn(x, rm, rv, training=True, momentum=momentum), rm, rv))
        torch.testing.assert_close(states[1], states[0], **F32)
    rm, rv = running(3, torch.float32)
    torch.testing.assert_close(fbt.batch_norm(x, rm, rv, eps=0.0), F.batch_norm(x, rm, rv, eps=0.0), **F32)


def _torch_error(call):
    try:
        call()
    except Exception as error:
        return error
    return None


ERROR_CASES = [
    ("size", lambda fn: fn(torch.randn(4, 3), torch.zeros(4), torch.ones(4), training=True)),
    ("weight size", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3), torch.ones(2), training=True)),
    ("one value", lambda fn: fn(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)),
    ("one value 3d", lambda fn: fn(torch.randn(1, 3, 1), None, None, training=True)),
    ("eps zero training", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, eps=0.0)),
    ("eps negative", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0)),
    ("eval without stats", lambda fn: fn(torch.randn(4, 3), None, None, training=False)),
    ("mixed dtype", lambda fn: fn(torch.randn(4, 3).double(), torch.zeros(3), torch.ones(3), training=True)),
    ("mixed dtype var", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3).double(), training=True)),
    ("training str", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training="False")),
    ("training tensor", lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=torch.tensor(True))),
    # Not a tensor (eval: torch's training check reads input.size() first): an AttributeError from the small-call
    # lane's first look at the input, before.
    ("input ndarray", lambda fn: fn(np.ones((4, 3), np.float32), torch.zeros(3), torch.ones(3))),
    ("input list", lambda fn: fn([[1.0, 2.0, 3.0]] * 4, torch.zeros(3), torch.ones(3))),
    ("input None", lambda fn: fn(None, torch.zeros(3), torch.ones(3))),
]
#: The argument each error names first, where the case is about one argument.
ERROR_NAMES = {
    "mixed dtype var": "running_var",
    "training str": "training",
    "training tensor": "training",
    "input ndarray": "input",
    "input list": "input",
    "input None": "input",
}


@pytest.mark.parametrize("case, call", ERROR_CASES, ids=[case for case, _ in ERROR_CASES])
def test_errors_have_torch_types_and_messages(case, call):
    expected = _torch_error(lambda: call(F.batch_norm))
    assert expected is not None
    rm, rv = running(3, torch.float32)
    got = _torch_error(lambda: call(fbt.batch_norm))
    assert isinstance(got, type(expected)), (case, got, expected)
    assert isinstance(got, (fbt.BatchNormError, fbt.BatchNormTypeError))
    first_line = str(expected).splitlines()[0]
    if "mixed dtype" in first_line:
        first_line = "mixed dtype (CPU): all inputs must share same datatype"
    assert first_line in str(got), (str(got), first_line)
    # The argument is named first, as everywhere in fastbn.
    named = str(got).split(":")[0].split()[0]
    assert named in {"input", "eps", "running_mean", "running_var", "weight", "bias", "training"}
    assert named == ERROR_NAMES.get(case, named), (case, str(got))
    assert rm.eq(running(3, torch.float32)[0]).all() and rv.eq(running(3, torch.float32)[1]).all()


def test_forward_refuses_tensors_that_require_grad():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"x: .*requires grad.*fastbn\.torch\.batch_norm"):
        fastbn.forward(x)
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"weight: .*requires grad"):
        fastbn.forward(x.detach(), weight)
    with torch.no_grad():
        y, _ = fastbn.forward(x, weight)
    torch.testing.assert_close(y, F.batch_norm(x.detach(), None, None, training=True))


# ------------------------------------------------------ bfloat16, autocast ---
def test_bfloat16_module_and_autocast_as_torch():
    x = randn(4, 3, 5, 5, dtype=torch.float32)
    ours, theirs = fbt.BatchNorm2d(3), nn.BatchNorm2d(3)
    for mf in (torch.contiguous_format, torch.channels_last):
        xb = x.bfloat16().to(memory_format=mf)
        y_ours, y_theirs = ours(xb), theirs(xb)
        assert y_ours.dtype == torch.bfloat16 and y_ours.is_contiguous(memory_format=mf)
        # Both compute in float32 and round the output once: at most an ulp of bfloat16 apart.
        torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **F32)
    conv = nn.Conv2d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(conv(x)), theirs(conv(x))
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------ fused forms ---
def test_fused_forms_match_torch_compositions():
    x, z = randn(4, 3, 5, grad=True), randn(4, 3, 5, seed=1, grad=True)
    w, b = randn(3, seed=2, grad=True), randn(3, seed=3, grad=True)
    rm, rv = running(3)
    y = fbt.batch_norm(x, rm.clone(), rv.clone(), w, b, True, activation="relu", residual=z)
    expected = torch.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True) + z)
    torch.testing.assert_close(y, expected, **F64)
    dy = randn(4, 3, 5, seed=4)
    torch.testing.assert_close(
        torch.autograd.grad(y, (x, z, w, b), dy), torch.autograd.grad(expected, (x, z, w, b), dy), **F64
    )
    # Ghost batches: each group of 2 samples normalised on its own; running stats from the group averages.
    rm1, rv1 = rm.clone(), rv.clone()
    y = fbt.batch_norm(x, rm1, rv1, w, b, True, virtual_batch_size=2)
    groups = [F.batch_norm(g, None, None, w, b, True) for g in x.split(2)]
    torch.testing.assert_close(y, torch.cat(groups), **F64)
    means = torch.stack([g.mean((0, 2)) for g in x.detach().split(2)]).mean(0)
    torch.testing.assert_close(rm1, 0.9 * rm + 0.1 * means, **F64)
    # The modules.
    modules = [fbt.BatchNormReLU1d(3).double(), fbt.BatchNormAddReLU1d(3).double(), nn.BatchNorm1d(3).double()]
    outputs = [modules[0](x), modules[1](x, z), modules[2](x)]
    torch.testing.assert_close(outputs[0], torch.relu(outputs[2]), **F64)
    torch.testing.assert_close(outputs[1], torch.relu(F.batch_norm(x, None, None, training=True) + z), **F64)
    for module in modules[:2]:
        torch.testing.assert_close(module.running_var, modules[2].running_var, **F64)
    ghost = fbt.BatchNorm1d(3, virtual_batch_size=2)
    assert "virtual_batch_size=2" in repr(ghost)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        fbt.BatchNorm1d(3, virtual_batch_size=0)


# ---------------------------------------------------------------- revert ---
def test_revert_gives_torch_modules_sharing_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), fbt.BatchNormReLU2d(4), nn.Conv2d(4, 4, 1), fbt.BatchNorm2d(4))
    block = fbt.BatchNormAddReLU2d(4)
    x = randn(2, 3, 4, 4, dtype=torch.float32)
    model(x)
    model.eval()
    expected = model(x)
    weight = model[1].weight
    reverted = fbt.revert(model)
    assert type(reverted[1]) is nn.Sequential and type(reverted[1][0]) is nn.BatchNorm2d
    assert type(reverted[3]) is nn.BatchNorm2d and reverted[1][0].weight is weight
    assert not any(type(m).__module__.startswith("fastbn") for m in reverted.modules())
    torch.testing.assert_close(reverted(x), expected)
    for exported in (torch.jit.script(reverted), torch.jit.trace(reverted, x)):
        torch.testing.assert_close(exported(x), expected)
    z = torch.randn(2, 4, 4, 4)
    h = torch.randn(2, 4, 4, 4)
    y_block = block(h, z)
    plain = fbt.revert(block)
    assert isinstance(plain, fbt.TorchBatchNormAddReLU) and type(plain.bn) is nn.BatchNorm2d
    block.eval(), plain.eval()
    torch.testing.assert_close(
        plain(h, z), torch.relu(F.batch_norm(h, block.running_mean, block.running_var, block.weight, block.bias) + z)
    )
    assert y_block.shape == h.shape
    # Round trip through convert, and a refusal that leaves everything as it was.
    again = fbt.convert(reverted)
    assert type(again[3]) is fbt.BatchNorm2d
    ghost = nn.Sequential(fbt.BatchNorm2d(4), fbt.BatchNorm2d(4, virtual_batch_size=2))
    with pytest.raises(ValueError, match="ghost batches or renorm"):
        fbt.revert(ghost)
    assert type(ghost[0]) is fbt.BatchNorm2d


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: fbt.BatchNormReLU2d(4), "a fused ReLU"),
        (lambda: fbt.BatchNormAddReLU2d(4), "a fused ReLU"),
        (lambda: fbt.BatchNorm2d(4, virtual_batch_size=2), "ghost batches or renorm"),
        (lambda: fbt.BatchNorm2d(4, renorm=(3.0, 5.0)), "ghost batches or renorm"),
    ],
)
def test_convert_sync_batchnorm_refuses_what_a_synchronised_batch_norm_would_drop(make, what):
    """SyncBatchNorm is a plain batch norm: replacing a fused or ghost/renorm module silently dropped its ReLU
    (negative outputs), its ghost batches or renorm, or changed its forward's arguments (the residual)."""
    model = nn.Sequential(fbt.BatchNorm2d(4), make(), nn.TransformerEncoderLayer(8, 2))  # a transformer's
    with pytest.raises(ValueError, match=f"^module: 1 uses {what}.*nothing was converted"):  # activation is not
        fbt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is fbt.BatchNorm2d  # nothing was replaced
    plain = nn.Sequential(nn.BatchNorm2d(4), fbt.BatchNorm2d(4), nn.TransformerEncoderLayer(8, 2))
    converted = fbt.SyncBatchNorm.convert_sync_batchnorm(plain)
    assert type(converted[0]) is type(converted[1]) is fbt.SyncBatchNorm


# --------------------------------------------------------- compile, export ---
def _small_cnn(block):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        block(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        block(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _train(model, x, target, compiled, autocast, steps=10):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step_model = torch.compile(model, fullgraph=True, backend="inductor") if compiled else model
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(step_model(x).float(), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_cnn_trains_like_torch(memory_format):
    # The bar: fullgraph inductor, 10 SGD steps, float32 within 1e-4, and again under bf16 autocast.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=generator).to(memory_format=memory_format)
    target = torch.randint(0, 4, (8,), generator=generator)
    for autocast in (False, True):
        theirs = _small_cnn(nn.BatchNorm2d).to(memory_format=memory_format)
        ours = _small_cnn(fbt.BatchNorm2d).to(memory_format=memory_format)
        losses_theirs = _train(theirs, x, target, compiled=False, autocast=autocast)
        losses_ours = _train(ours, x, target, compiled=True, autocast=autocast)
        # bfloat16 rounds each activation to 8 bits, in both; float32 agrees to 1e-4.
        tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(losses_ours, losses_theirs, **tol)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), **tol)


def test_compile_dynamic_takes_symbolic_float_options_and_modules_as_torch():
    """Under dynamic=True, momentum and eps given as arguments (or read from a module) are symbolic floats;
    math.isfinite on them broke the graph (fatal with fullgraph), where torch's own compile."""
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, rm, rv, m, eps: fbt.batch_norm(x, rm, rv, None, None, True, m, eps),
        backend="eager",
        fullgraph=True,
        dynamic=True,
    )
    x = randn(4, 3, dtype=torch.float32)
    for momentum in (0.1, 0.2, 0.3):
        ours, theirs = running(3, torch.float32), running(3, torch.float32)
        compiled(x, *ours, momentum, 1e-3)
        torch.nn.functional.batch_norm(x, *theirs, None, None, True, momentum, 1e-3)
        torch.testing.assert_close(ours, theirs, **F32)
    for momentum in (0.1, None):
        torch._dynamo.reset()
        ours, theirs = fbt.BatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
        step = torch.compile(ours, backend="eager", fullgraph=True, dynamic=True)
        for seed in range(3):
            x = randn(2, 3, 4, 4, dtype=torch.float32, seed=seed)
            torch.testing.assert_close(step(x), theirs(x), **F32)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **F32)


def test_compile_backends_dynamic_shapes_and_export():
    rm, rv = running(3, torch.float32)

    def fn(x, w, z):
        return fbt.batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5, activation="relu", residual=z)

    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=True)
        for n in (4, 6):
            x = randn(n, 3, 5, dtype=torch.float32, grad=True)
            w = randn(3, dtype=torch.float32, seed=1, grad=True)
            z = randn(n, 3, 5, dtype=torch.float32, seed=2)
            before = rm.clone()
            y = compiled(x, w, z)
            after = rm.clone()
            rm.copy_(before)
            y_eager = fn(x, w, z)
            torch.testing.assert_close(y, y_eager, **F32)
            torch.testing.assert_close(after, rm, **F32)
            torch.testing.assert_close(
                torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(y_eager.sum(), (x, w)), **F32
            )
    model = nn.Sequential(nn.Conv2d(3, 4, 1), fbt.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    for training in (True, False):
        model.train(training)
        exported = torch.export.export(model, (x,))
        assert any("fastbn" in str(node.target) for node in exported.graph.nodes)
        state = copy.deepcopy(model.state_dict())
        expected = model(x)
        model.load_state_dict(state)
        torch.testing.assert_close(exported.module()(x), expected, **F32)


def test_renorm_without_running_statistics_is_refused_by_the_modules_as_by_batch_norm():
    """track_running_stats=False (or buffers set to None later) with renorm trained as plain batch norm,
    silently; batch_norm itself refuses the combination by name."""
    with pytest.raises(ValueError, match=r"^renorm: batch renormalization needs running statistics"):
        fbt.BatchNorm2d(3, track_running_stats=False, renorm=(2.0, 1.0))
    module = fbt.BatchNorm2d(3, renorm=(2.0, 1.0))
    module.running_mean = module.running_var = None
    with pytest.raises(ValueError, match=r"^renorm: batch renormalization needs running statistics"):
        module(randn(2, 3, 4, 4, dtype=torch.float32))
    module.eval()
    module(randn(2, 3, 4, 4, dtype=torch.float32))  # eval: batch statistics, no renorm to apply
