"""fastbn.torch against torch itself, on the installed torch's own test databases (imported, not copied).

* ``common_modules.module_db``, entries ``nn.BatchNorm1d/2d/3d``: every ``module_inputs_func``
  input (constructor arguments and forward input) on the CPU in float32 and float64, train and
  eval.  torch's module and fastbn's get identical state (random affine parameters and running
  statistics), run two forward passes, then one backward of random output gradients; outputs,
  running statistics, ``num_batches_tracked`` and the gradients of input, weight and bias must
  agree.  The entries' ``module_error_inputs_func`` inputs must raise as torch's test_modules
  requires (exception class and message pattern).
* ``common_methods_invocations.op_db``, entry ``nn.functional.batch_norm`` (the CPU variant): every
  ``sample_inputs`` sample in every dtype the OpInfo declares for the CPU (float32, float64,
  bfloat16, float16).  ``torch.nn.functional.batch_norm`` and ``fastbn.torch.batch_norm`` run on
  clones of the same tensors; outputs, the running statistics updated in place, and the gradients
  of input, weight and bias must agree, and where torch raises, fastbn must raise an instance of
  the same class.  In float64 also what the OpInfo promises beyond that (``supports_forward_ad``,
  ``supports_gradgrad``, and batch rules as functorch's tests use them): forward-mode AD
  (``torch.func.jvp``), double backward, and ``torch.func.vmap`` over the input; and two things
  torch's own OpInfo and test_nn tests feed it: a negative-bit view as input (TestMathBits), and
  forward-mode duals on the running statistics (refused in eval).  The OpInfo's ``error_inputs``
  are checked if it has any (torch 2.13's has none).

Everything here is what torch does; nothing is skipped.  Tolerances (``TOL``; rtol, and atol as a
fraction of the largest reference magnitude): float64 1e-10 -- the formulas are the same, only
the summation order differs, which costs a few ulps (1e-16) times the reduction length;
float32 1e-5 -- a few ulps (6e-8) times reductions of up to ~300 elements with a different order
and fusion of the affine step (torch's own float32 results lie within 3e-7 of its float64 ones on
these inputs); bfloat16 and float16 two units of the last place of their 8- and 11-bit mantissas
(2**-7, 2**-10), since both libraries compute in float32 and round the result (and the gradient
again), so a float32 difference can tip a rounding either way (torch's bfloat16 results lie within
6.5e-3 of its float64 ones, its float16 ones within 6e-4).
"""

from __future__ import annotations

import hypothesis
import pytest

torch = pytest.importorskip("torch")

# torch.testing._internal.common_utils, imported below, loads a Hypothesis profile of its own
# ("pytorch_ci" under CI=true: 50 examples, the default deadline) for the whole process; put the
# suite's profile (tests/conftest.py) back once the databases are imported.
_SUITE_PROFILE = hypothesis.settings.default

import torch.nn.functional as F  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

hypothesis.settings.register_profile("fastbn-suite-before-torch-testing", parent=_SUITE_PROFILE)
hypothesis.settings.load_profile("fastbn-suite-before-torch-testing")

DEVICE = "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}

MODULE_INFOS = {
    info.name: info for info in module_db if info.name in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")
}
OPINFO = next(op for op in op_db if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")
OP_DTYPES = sorted(OPINFO.supported_dtypes(DEVICE), key=str)


def assert_matches(actual, expected, what, dtype=None):
    """``actual`` equals torch's ``expected`` within TOL (NaN where torch has NaN), same dtype and shape."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: fastbn {actual!r}, torch {expected!r}"
        return
    tol = TOL[dtype or expected.dtype] if expected.is_floating_point() else 0
    expected, actual = expected.detach(), actual.detach()
    finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


# --- module_db: BatchNorm1d/2d/3d ---------------------------------------------------------------


def module_inputs(info, dtype, training):
    return info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True, training=training)


MODULE_CASES = [
    pytest.param(
        name,
        index,
        dtype,
        training,
        id=f"{name[3:]}-{module_input.desc or 'default'}-{str(dtype)[6:]}-{'train' if training else 'eval'}",
    )
    for name, info in MODULE_INFOS.items()
    for dtype in (torch.float32, torch.float64)
    for training in (True, False)
    for index, module_input in enumerate(module_inputs(info, dtype, training))
]


def _randomize(module, generator):
    """Random affine parameters and running statistics (so eval is not the identity)."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.copy_(values + 0.5 if name in ("weight", "running_var") else 2 * values - 1)
        if getattr(module, "num_batches_tracked", None) is not None:
            module.num_batches_tracked.fill_(3)


def _state(module):
    return {name: getattr(module, name, None) for name in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("name, index, dtype, training", MODULE_CASES)
def test_module_db_entry_matches_torch(name, index, dtype, training):
    info = MODULE_INFOS[name]
    module_input = module_inputs(info, dtype, training)[index]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    reference = info.module_cls(*args, **kwargs).to(DEVICE, dtype)
    fast = getattr(fbt, info.module_cls.__name__)(*args, **kwargs).to(DEVICE, dtype)
    _randomize(reference, torch.Generator().manual_seed(index))
    fast.load_state_dict(reference.state_dict())
    reference.train(training)
    fast.train(training)

    first = module_input.forward_input.args[0].detach()
    generator = torch.Generator().manual_seed(100 + index)
    second = first * 0.5 + torch.randn(first.shape, generator=generator, dtype=dtype)
    grads = [torch.randn(first.shape, generator=generator, dtype=dtype) for _ in range(2)]
    outputs = {}
    for label, module in (("torch", reference), ("fastbn", fast)):
        inputs = [x.clone().requires_grad_(True) for x in (first, second)]
        results = []
        for x in inputs:
            results.append(module(x))
            results.append({k: (None if v is None else v.clone()) for k, v in _state(module).items()})
        loss = sum((out * grad).sum() for out, grad in zip(results[::2], grads))
        loss.backward()
        outputs[label] = (
            results,
            [x.grad for x in inputs],
            {p: getattr(module, p).grad if getattr(module, p, None) is not None else None for p in ("weight", "bias")},
        )

    (ref_results, ref_input_grads, ref_param_grads), (results, input_grads, param_grads) = (
        outputs["torch"],
        outputs["fastbn"],
    )
    for step in range(2):
        assert_matches(results[2 * step], ref_results[2 * step], f"output of forward {step + 1}")
        for key, ref_value in ref_results[2 * step + 1].items():
            assert_matches(results[2 * step + 1][key], ref_value, f"{key} after forward {step + 1}")
        assert_matches(input_grads[step], ref_input_grads[step], f"input {step + 1} gradient")
    for key, ref_value in ref_param_grads.items():
        assert_matches(param_grads[key], ref_value, f"{key} gradient")


MODULE_ERROR_CASES = [
    pytest.param(name, dtype, index, id=f"{name[3:]}-{str(dtype)[6:]}-{index}")
    for name, info in MODULE_INFOS.items()
    if info.module_error_inputs_func is not None
    for dtype in (torch.float32, torch.float64)
    for index, _ in enumerate(
        info.module_error_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=False, training=True)
    )
]


@pytest.mark.parametrize("name, dtype, index", MODULE_ERROR_CASES)
def test_module_db_error_input_raises_like_torch(name, dtype, index):
    """As torch's test_modules test_errors: the error's class and message pattern, at the stage it names.

    As there, the module keeps its default float32 parameters and ``dtype`` is the input's: torch
    reports the bad ``eps`` (a ValueError) before it would look at the mixed dtypes.
    """
    info = MODULE_INFOS[name]
    error_input = info.module_error_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=False, training=True)[
        index
    ]
    module_input = error_input.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    for cls in (info.module_cls, getattr(fbt, info.module_cls.__name__)):
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                cls(*args, **kwargs)
        else:
            module = cls(*args, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                module(*module_input.forward_input.args, **module_input.forward_input.kwargs)


# --- op_db: nn.functional.batch_norm --------------------------------------------------------------


def samples(dtype, requires_grad=True):
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return list(OPINFO.sample_inputs(DEVICE, dtype, requires_grad=requires_grad))


def _describe(sample):
    shape = "x".join(map(str, sample.input.shape)) or "scalar"
    return shape + "".join(f"-{k}={v}" for k, v in sample.kwargs.items())


OP_CASES = [
    pytest.param(dtype, index, id=f"{str(dtype)[6:]}-{index}-{_describe(sample)}")
    for dtype in OP_DTYPES
    for index, sample in enumerate(samples(dtype, requires_grad=False))
]
F64_CASES = [case for case in OP_CASES if case.values[0] == torch.float64]
F64_STATS_CASES = [
    case for case in F64_CASES if samples(torch.float64, requires_grad=False)[case.values[1]].args[0] is not None
]


def _clone_args(sample):
    """Fresh leaves for one call: (input, args, the tensors that take gradients)."""

    def clone(t):
        return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

    x = clone(sample.input)
    args = [clone(a) for a in sample.args]
    return x, args, [t for t in [x, *args] if t is not None and t.requires_grad]


def _run(function, sample, grad_seed=None):
    """(output, running stats after, gradients) or the exception raised."""
    x, args, leaves = _clone_args(sample)
    try:
        out = function(x, *args, **sample.kwargs)
        grads = None
        if grad_seed is not None and leaves:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
            grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    except Exception as exc:
        return exc
    return out, args[:2], grads


def _assert_same_failure(fast, reference, what):
    if isinstance(reference, Exception):
        assert isinstance(fast, type(reference)), (
            f"{what}: torch raises {type(reference).__name__} ({reference}); fastbn "
            + (f"raises {type(fast).__name__} ({fast})" if isinstance(fast, Exception) else "does not raise")
        )
        return True
    if isinstance(fast, Exception):
        raise AssertionError(f"{what}: torch succeeds, fastbn raises {type(fast).__name__}: {fast}") from fast
    return False


@pytest.mark.parametrize("dtype, index", OP_CASES)
def test_opinfo_sample_matches_torch(dtype, index):
    sample = samples(dtype)[index]
    reference = _run(F.batch_norm, sample, grad_seed=index)
    fast = _run(fbt.batch_norm, sample, grad_seed=index)
    if _assert_same_failure(fast, reference, "batch_norm"):
        return
    (ref_out, ref_stats, ref_grads), (out, stats, grads) = reference, fast
    assert_matches(out, ref_out, "output")
    for name, value, ref_value in zip(("running_mean", "running_var"), stats, ref_stats):
        assert_matches(value, ref_value, f"{name} (updated in place)")
    for k, (grad, ref_grad) in enumerate(zip(grads or (), ref_grads or ())):
        assert_matches(grad, ref_grad, f"gradient of differentiable argument {k}")


@pytest.mark.parametrize("dtype, index", F64_CASES)
def test_opinfo_sample_forward_ad_matches_torch(dtype, index):
    """``supports_forward_ad=True``: torch.func.jvp in input, weight and bias."""
    assert OPINFO.supports_forward_ad
    sample = samples(dtype)[index]

    def jvp(function):
        x, args, leaves = _clone_args(sample)
        positions = [i for i, t in enumerate([x, *args]) if t is not None and t.requires_grad]
        primals = tuple(t.detach() for t in leaves)
        tangents = tuple(
            torch.randn(t.shape, generator=torch.Generator().manual_seed(index + i), dtype=t.dtype)
            for i, t in enumerate(primals)
        )

        def call(*differentiable):
            full = [x.detach(), *[None if a is None else a.detach() for a in args]]
            for position, value in zip(positions, differentiable):
                full[position] = value
            # the running statistics are the sample's (cloned) tensors: updated in place
            full[1:3] = args[:2]
            return function(full[0], *full[1:], **sample.kwargs)

        try:
            return torch.func.jvp(call, primals, tangents), args[:2]
        except Exception as exc:
            return exc

    reference, fast = jvp(F.batch_norm), jvp(fbt.batch_norm)
    if _assert_same_failure(fast, reference, "jvp"):
        return
    ((ref_out, ref_tangent), ref_stats), ((out, tangent), stats) = reference, fast
    assert_matches(out, ref_out, "jvp primal output")
    assert_matches(tangent, ref_tangent, "jvp tangent output")
    for name, value, ref_value in zip(("running_mean", "running_var"), stats, ref_stats):
        assert_matches(value, ref_value, f"{name} after jvp")


@pytest.mark.parametrize("dtype, index", F64_CASES)
def test_opinfo_sample_double_backward_matches_torch(dtype, index):
    """``supports_gradgrad=True``: the gradient of (gradients . v) in input, weight and bias."""
    assert OPINFO.supports_gradgrad
    sample = samples(dtype)[index]

    def gradgrad(function):
        x, args, leaves = _clone_args(sample)
        try:
            out = function(x, *args, **sample.kwargs)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(index), dtype=dtype)
            grad_out.requires_grad_(True)
            grads = torch.autograd.grad(out, leaves, grad_out, create_graph=True, allow_unused=True)
            used = [(g, t) for g, t in zip(grads, leaves) if g is not None]
            vs = [
                torch.randn(g.shape, generator=torch.Generator().manual_seed(7 + i), dtype=dtype)
                for i, (g, _) in enumerate(used)
            ]
            total = sum((g * v).sum() for (g, _), v in zip(used, vs))
            return torch.autograd.grad(total, [*leaves, grad_out], allow_unused=True)
        except Exception as exc:
            return exc

    reference, fast = gradgrad(F.batch_norm), gradgrad(fbt.batch_norm)
    if _assert_same_failure(fast, reference, "double backward"):
        return
    for k, (value, ref_value) in enumerate(zip(fast, reference)):
        assert_matches(value, ref_value, f"second-order gradient {k}")


@pytest.mark.parametrize("dtype, index", F64_CASES)
def test_opinfo_sample_vmap_matches_torch(dtype, index):
    """torch.func.vmap over a batch of two inputs (the other arguments shared), as functorch's tests do.

    torch refuses (RuntimeError) to vmap a training call that would update unbatched running
    statistics; fastbn must then refuse likewise.
    """
    sample = samples(dtype, requires_grad=False)[index]

    def batched(function):
        x, args, _ = _clone_args(sample)
        xs = torch.stack([x, 2 * x + 1])
        try:
            return torch.func.vmap(lambda xi: function(xi, *args, **sample.kwargs))(xs), args[:2]
        except Exception as exc:
            return exc

    reference, fast = batched(F.batch_norm), batched(fbt.batch_norm)
    if _assert_same_failure(fast, reference, "vmap"):
        return
    (ref_out, ref_stats), (out, stats) = reference, fast
    assert_matches(out, ref_out, "vmap output")
    for name, value, ref_value in zip(("running_mean", "running_var"), stats, ref_stats):
        assert_matches(value, ref_value, f"{name} after vmap")


@pytest.mark.parametrize("dtype, index", F64_CASES)
def test_opinfo_sample_neg_view_matches_torch(dtype, index):
    """A negative-bit view as input (what torch's TestMathBits test_neg_view passes): same values as -x."""
    sample = samples(dtype, requires_grad=False)[index]

    def call(function):
        x, args, _ = _clone_args(sample)
        try:
            return function(torch._neg_view(-x), *args, **sample.kwargs), args[:2]
        except Exception as exc:
            return exc

    reference, fast = call(F.batch_norm), call(fbt.batch_norm)
    if _assert_same_failure(fast, reference, "neg view"):
        return
    assert_matches(fast[0], reference[0], "output for a neg-view input")
    for name, value, ref_value in zip(("running_mean", "running_var"), fast[1], reference[1]):
        assert_matches(value, ref_value, name)


@pytest.mark.parametrize("dtype, index", F64_STATS_CASES)
def test_opinfo_sample_forward_ad_through_running_stats_like_torch(dtype, index):
    """Dual running statistics (with a dual input): torch refuses with a RuntimeError ("batch_norm is
    not differentiable wrt running_mean and running_var"), as test_nn's
    test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad checks."""
    import torch.autograd.forward_ad as fwAD

    sample = samples(dtype, requires_grad=False)[index]

    def call(function):
        x, args, _ = _clone_args(sample)
        with fwAD.dual_level():
            dual_x = fwAD.make_dual(x, torch.ones_like(x))
            dual_mean = fwAD.make_dual(args[0], torch.ones_like(args[0]))
            try:
                return function(dual_x, dual_mean, *args[1:], **sample.kwargs)
            except Exception as exc:
                return exc

    reference, fast = call(F.batch_norm), call(fbt.batch_norm)
    _assert_same_failure(fast, reference, "forward AD through running_mean")


COW_CASES = OP_CASES


def _cow_call(function, sample):
    """Run forward and backward on copy-on-write clones of a sample (``torch._lazy_clone``, as torch's
    test_cow_input does); return which positional arguments and output gradients lost their sharing
    (were materialized) in forward and in backward, or the exception raised."""
    x, args, _ = _clone_args(sample)
    inputs = [x, *args]
    cows = [torch._lazy_clone(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    cow = torch._C._is_cow_tensor
    lost = {"forward": [], "backward": []}
    try:
        out = function(*cows, **sample.kwargs)
        lost["forward"] = [i for i, t in enumerate(cows) if isinstance(t, torch.Tensor) and not cow(t)]
        leaves = [t for t in cows if isinstance(t, torch.Tensor) and t.requires_grad]
        if leaves and out.requires_grad:
            grad_out = torch._lazy_clone(torch.ones_like(out))
            torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
            lost["backward"] = [i for i, t in enumerate(cows) if isinstance(t, torch.Tensor) and not cow(t)]
            lost["backward"] += ["grad_output"] if not cow(grad_out) else []
    except Exception as exc:
        return exc
    return lost


@pytest.mark.parametrize("dtype, index", COW_CASES)
def test_opinfo_sample_leaves_copy_on_write_inputs_shared_like_torch(dtype, index):
    """torch's TestCompositeCompliance.test_cow_input: an operator must read copy-on-write inputs
    without materializing them (copying the shared memory), in forward and in backward, except the
    arguments the OpInfo lists (for batch norm the running statistics, positions 1 and 2, which
    training writes).  torch's F.batch_norm holds to it; so must fastbn."""
    sample = samples(dtype)[index]
    allowed = {
        "forward": set(OPINFO.allow_cow_input_materialize_forward or ()),
        "backward": set(OPINFO.allow_cow_input_materialize_backward or ()),
    }
    assert OPINFO.supports_cow_input_no_materialize_forward and OPINFO.supports_cow_input_no_materialize_backward
    reference, fast = _cow_call(F.batch_norm, sample), _cow_call(fbt.batch_norm, sample)
    if _assert_same_failure(fast, reference, "copy-on-write inputs"):
        return
    for phase in ("forward", "backward"):
        assert not set(reference[phase]) - allowed[phase], f"torch itself materializes {reference[phase]}"
        assert not set(fast[phase]) - allowed[phase], (
            f"fastbn materializes copy-on-write argument(s) {sorted(set(fast[phase]) - allowed[phase], key=str)} "
            f"in {phase} (torch: {reference[phase]})"
        )


ERROR_CASES = (
    [pytest.param(index, id=str(index)) for index, _ in enumerate(OPINFO.error_inputs(DEVICE))]
    if OPINFO.error_inputs_func is not None
    else []
)

if ERROR_CASES:  # torch 2.13's OpInfo has no error_inputs; a later torch's would be checked here

    @pytest.mark.parametrize("index", ERROR_CASES)
    def test_opinfo_error_input_raises_like_torch(index):
        error_input = list(OPINFO.error_inputs(DEVICE))[index]
        sample = error_input.sample_input
        for function in (F.batch_norm, fbt.batch_norm):
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                function(sample.input, *sample.args, **sample.kwargs)


def test_the_databases_are_the_expected_ones():
    """The parametrization above saw what it should: three module entries, four CPU dtypes, samples."""
    assert sorted(MODULE_INFOS) == ["nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"]
    assert set(OP_DTYPES) == {torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert len(MODULE_CASES) >= 3 * 2 * 2 * 7 and len(OP_CASES) >= 4 * 10 and MODULE_ERROR_CASES
    assert all(case.values[0] in TOL for case in OP_CASES)
