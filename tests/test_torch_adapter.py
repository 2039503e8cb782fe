"""fastbn.torch against torch itself: the functional batch_norm, its autograd, the BatchNorm*d
modules, convert(), and a small CNN trained with each.  Skips only when torch is missing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

# float32: a few ulps of each output, reductions over <= 1e3 elements; float64: exact formulas.
TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_input(shape, dtype=torch.float32, channels_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_params(channels, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_var = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (weight, bias, running_mean, running_var)]


# -------------------------------------------------------------- functional ---
FUNCTIONAL_CASES = [
    # shape, dtype, channels_last, training, affine, running
    ((16, 5), torch.float32, False, True, True, True),
    ((16, 5), torch.float64, False, False, True, True),
    ((4, 3, 7), torch.float32, False, True, False, True),
    ((4, 3, 7), torch.float32, False, True, True, False),
    ((4, 3, 5, 6), torch.float32, False, True, True, True),
    ((4, 3, 5, 6), torch.float32, True, True, True, True),
    ((4, 3, 5, 6), torch.float32, True, False, True, True),
    ((4, 3, 5, 6), torch.float64, True, True, False, False),
    ((2, 3, 2, 3, 4), torch.float32, False, True, True, True),
    ((2, 3, 2, 3, 4), torch.float32, True, False, False, True),
    ((4, 3, 5, 6), torch.float16, False, True, True, True),
    ((4, 3, 5, 6), torch.float16, True, False, True, True),
]


@pytest.mark.parametrize("shape, dtype, channels_last, training, affine, running", FUNCTIONAL_CASES)
def test_batch_norm_matches_torch_functional(shape, dtype, channels_last, training, affine, running):
    channels = shape[1]
    weight, bias, rm, rv = make_params(channels, stats_dtype(dtype))
    if not affine:
        weight = bias = None
    outputs = {}
    for name, fn in (("torch", F.batch_norm), ("fastbn", fbt.batch_norm)):
        x = make_input(shape, dtype, channels_last).requires_grad_()
        w = None if weight is None else weight.clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        running_mean = rm.clone() if running else None
        running_var = rv.clone() if running else None
        y = fn(x, running_mean, running_var, w, b, training=training, momentum=0.3, eps=1e-4)
        dy = make_input(shape, dtype, channels_last, seed=2)
        y.backward(dy)
        outputs[name] = dict(
            y=y,
            dx=x.grad,
            dweight=None if w is None else w.grad,
            dbias=None if b is None else b.grad,
            running_mean=running_mean,
            running_var=running_var,
        )
    ours, ref = outputs["fastbn"], outputs["torch"]
    for key, expected in ref.items():
        got = ours[key]
        if expected is None:
            assert got is None, key
            continue
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        torch.testing.assert_close(
            got,
            expected,
            **TOL[got.dtype if key in ("y", "dx") else stats_dtype(dtype)],
            msg=lambda m, key=key: f"{key}: {m}",
        )
    # Memory format: output and input gradient keep the input's.
    if channels_last:
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert ours["y"].is_contiguous(memory_format=memory_format)
        assert ours["dx"].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(training, channels_last):
    x = make_input((3, 2, 3, 2), torch.float64, channels_last).requires_grad_()
    weight, bias, rm, rv = make_params(2, torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, weight, bias):
        return fbt.batch_norm(x, rm, rv, weight, bias, training=training, momentum=0.1, eps=1e-5)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    # Without affine parameters too.
    assert torch.autograd.gradcheck(lambda x: fbt.batch_norm(x, rm, rv, training=training), (x,))


def test_needs_input_grad():
    x = make_input((8, 3))
    weight, bias, rm, rv = make_params(3, torch.float32)
    weight.requires_grad_()
    y = fbt.batch_norm(x, rm, rv, weight, bias, training=True)
    y.sum().backward()
    assert x.grad is None and bias.grad is None and weight.grad is not None
    # Nothing requires grad: a plain tensor, no graph.
    y = fbt.batch_norm(x, rm, rv, training=True)
    assert not y.requires_grad and y.grad_fn is None


def test_running_stats_updated_in_place_with_version_bump():
    x = make_input((8, 3))
    rm, rv = torch.zeros(3), torch.ones(3)
    pointer, version = rm.data_ptr(), rm._version
    fbt.batch_norm(x, rm, rv, training=True, momentum=0.5)
    assert rm.data_ptr() == pointer and rm._version > version
    expected_rm = 0.5 * x.mean(0)
    torch.testing.assert_close(rm, expected_rm)
    torch.testing.assert_close(rv, 0.5 + 0.5 * x.var(0, unbiased=True))
    # Eval reads them without touching them.
    version = rm._version
    fbt.batch_norm(x, rm, rv, training=False)
    assert rm._version == version
    torch.testing.assert_close(rm, expected_rm)


def test_half_input_with_half_parameters_matches_torch():
    # torch accepts an all-float16 BatchNorm (module.half()); fastbn widens the parameters.
    modules = [nn.BatchNorm2d(3).half(), fbt.BatchNorm2d(3).half(), nn.BatchNorm2d(3).double()]
    with torch.no_grad():
        for module in modules:
            module.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            module.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = make_input((4, 3, 5, 5), torch.float16)
    dy = make_input((4, 3, 5, 5), torch.float64, seed=3)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
    ys = [module(inp) for module, inp in zip(modules, xs)]
    for y in ys:
        (y.double() * dy).sum().backward()
    ref, ours, exact = modules
    assert ys[1].dtype == torch.float16 and ours.weight.grad.dtype == torch.float16
    assert ours.running_var.dtype == torch.float16
    # Against torch in float16, and against float64 within float16 rounding of each output.
    torch.testing.assert_close(ys[1], ys[0], **TOL[torch.float16])
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL[torch.float16])
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL[torch.float16])
    for got, expected in (
        (ys[1], ys[2]),
        (xs[1].grad, xs[2].grad),
        (ours.weight.grad, exact.weight.grad),
        (ours.bias.grad, exact.bias.grad),
    ):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected.detach(), rtol=2e-3, atol=2e-3 * scale)


def test_functional_errors_match_torch():
    x = make_input((8, 3))
    rm, rv = torch.zeros(3), torch.ones(3)
    for fn in (F.batch_norm, fbt.batch_norm):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            fn(x, rm.bfloat16(), rv.bfloat16(), training=True)
        with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
            fn(x, torch.zeros(4), torch.ones(4), training=True)
        with pytest.raises(RuntimeError, match=r"running_mean .*must be defined in evaluation mode"):
            fn(x, None, None, training=False)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            fn(x[:1], rm, rv, training=True)
    assert rm.eq(0).all() and rv.eq(1).all()


# ------------------------------------------------------------------ modules ---
MODULES = [
    (nn.BatchNorm1d, fbt.BatchNorm1d, (6, 4, 5)),
    (nn.BatchNorm2d, fbt.BatchNorm2d, (6, 4, 3, 5)),
    (nn.BatchNorm3d, fbt.BatchNorm3d, (3, 4, 2, 3, 5)),
]
CONSTRUCTOR_KWARGS = [
    {},
    dict(eps=1e-3, momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(momentum=0.25, dtype=torch.float64, device="cpu"),
]


@pytest.mark.parametrize("torch_cls, fastbn_cls, shape", MODULES)
@pytest.mark.parametrize("kwargs", CONSTRUCTOR_KWARGS)
def test_module_matches_torch_in_train_and_eval(torch_cls, fastbn_cls, shape, kwargs):
    ref, ours = torch_cls(4, **kwargs), fastbn_cls(4, **kwargs)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(ref)
    # Same parameters and buffers: names, shapes, dtypes, values.
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for key in ref_state:
        assert our_state[key].dtype == ref_state[key].dtype and torch.equal(our_state[key], ref_state[key]), key
    dtype = kwargs.get("dtype", torch.float32)
    if ref.affine:
        with torch.no_grad():
            for module in (ref, ours):
                module.weight.copy_(torch.linspace(0.5, 2.0, 4))
                module.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    for step, training in enumerate([True, True, True, False, True, False]):
        ref.train(training)
        ours.train(training)
        x = make_input(shape, dtype, seed=step)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ref(xs[0]), ours(xs[1])]
        for y in ys:
            (y * make_input(shape, dtype, seed=100 + step)).sum().backward()
        torch.testing.assert_close(ys[1], ys[0], **TOL[dtype])
        torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL[dtype])
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, **TOL[dtype], msg=f"step {step}: {key}")
        if ref.affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[dtype])
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[dtype])


def test_state_dict_loads_both_ways():
    ref = nn.BatchNorm2d(3, momentum=None)
    for step in range(3):
        ref(make_input((4, 3, 2, 2), seed=step))
    ours = fbt.BatchNorm2d(3, momentum=None)
    ours.load_state_dict(ref.state_dict())
    assert int(ours.num_batches_tracked) == 3
    # Training continues from the same state (momentum None uses the counter).
    x = make_input((4, 3, 2, 2), seed=9)
    ref(x)
    ours(x)
    back = nn.BatchNorm2d(3, momentum=None)
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("torch_cls, fastbn_cls, shape", MODULES)
def test_module_errors_match_torch(torch_cls, fastbn_cls, shape):
    ref, ours = torch_cls(4), fastbn_cls(4)
    one_per_channel = torch.ones((1, 4) + (1,) * (len(shape) - 2))
    for module in (ref, ours):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            module(one_per_channel)
    # fastbn leaves the buffers untouched by a rejected batch (torch counts it).
    assert int(ours.num_batches_tracked) == 0
    wrong_rank = torch.ones((6, 4, 2, 2, 2, 2))  # 6-D: wrong for every class
    messages = []
    for module in (ref, ours):
        with pytest.raises(ValueError) as info:
            module(wrong_rank)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    # Eval with one value per channel is fine, as in torch.
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(one_per_channel), ref(one_per_channel))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    ours = fbt.BatchNorm1d(3, track_running_stats=False).eval()
    assert ours.running_mean is None and ours.num_batches_tracked is None
    x = make_input((10, 3))
    torch.testing.assert_close(ours(x), F.batch_norm(x, None, None, ours.weight, ours.bias, training=True))


# ------------------------------------------------------------------ convert ---
class Custom(nn.BatchNorm2d):
    """A subclass: convert must leave it alone (it may change the behaviour)."""


def test_convert_swaps_every_batchnorm_keeping_state():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        shared,
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), shared, Custom(4)),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.BatchNorm1d(5, affine=False, momentum=None),
        nn.Unflatten(1, (5, 1, 1, 1)),
        nn.BatchNorm3d(5, eps=1e-3),
    )
    for step in range(2):
        model(make_input((4, 3, 3, 3), seed=step))
    model.eval()
    shared.weight.requires_grad_(False)
    x = make_input((4, 3, 3, 3), seed=5)
    expected = model(x)
    parameters = {id(p) for p in model.parameters()}
    buffers = {id(b) for b in model.buffers()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    converted = fbt.convert(model)
    assert converted is model
    assert type(model[1]) is fbt.BatchNorm2d and model[3][1] is model[1]  # still shared
    assert type(model[3][2]) is Custom
    assert type(model[6]) is fbt.BatchNorm1d and model[6].momentum is None and not model[6].affine
    assert type(model[8]) is fbt.BatchNorm3d and model[8].eps == 1e-3
    assert not model[1].training and not model[1].weight.requires_grad
    assert {id(p) for p in model.parameters()} == parameters
    assert {id(b) for b in model.buffers()} == buffers
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(model(x), expected)
    # A batch-norm module on its own is replaced and returned.
    single = fbt.convert(nn.BatchNorm1d(2))
    assert type(single) is fbt.BatchNorm1d
    with pytest.raises(TypeError, match=r"^module: "):
        fbt.convert("model")


# ---------------------------------------------------------- training a CNN ---
def make_cnn(batch_norm_cls, momentum):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        batch_norm_cls(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        batch_norm_cls(8, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cnn_training_matches_torch(momentum, memory_format):
    generator = torch.Generator().manual_seed(1)
    # Labels from a fixed projection of the images: something to learn in 20 steps.
    projection = torch.randn(3 * 6 * 6, 5, generator=generator)
    images = [torch.randn(16, 3, 6, 6, generator=generator) * 2 + 1 for _ in range(4)]
    batches = [(image, (image.flatten(1) @ projection).argmax(1)) for image in images] * 5  # 20 steps
    runs = {}
    for name, cls in (("torch", nn.BatchNorm2d), ("fastbn", fbt.BatchNorm2d)):
        model = make_cnn(cls, momentum).to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for images, labels in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images.to(memory_format=memory_format)), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        runs[name] = dict(
            losses=losses,
            state=model.state_dict(),
            model=model,
            eval_output=model(batches[0][0].to(memory_format=memory_format)),
        )
    ref, ours = runs["torch"], runs["fastbn"]
    assert isinstance(ours["model"][1], fbt.BatchNorm2d) and not isinstance(ref["model"][1], fbt.BatchNorm2d)
    np.testing.assert_allclose(ours["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    assert np.mean(ref["losses"][-4:]) < 0.7 * np.mean(ref["losses"][:4])  # it did learn
    for key, value in ref["state"].items():
        torch.testing.assert_close(ours["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(ours["eval_output"], ref["eval_output"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["before the kernel", "after the kernel"])
def test_an_interrupted_module_call_counts_exactly_the_batches_its_statistics_took_in(monkeypatch, where):
    """``num_batches_tracked`` is incremented after the kernel returns; a KeyboardInterrupt (or a signal
    handler's exception) landing in between must not leave the count behind the running statistics.
    Simulated at both points: before the kernel nothing changes, after it the batch is counted."""
    from fastbn.torch import _modules

    ours = fbt.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    ours(x)
    mean, var = ours.running_mean.clone(), ours.running_var.clone()
    real = _modules.batch_norm

    def interrupted(*args, **kwargs):
        if where == "after the kernel":
            real(*args, **kwargs)  # the running statistics are updated by now
        raise KeyboardInterrupt

    monkeypatch.setattr(_modules, "batch_norm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ours(x * 3 + 1)
    updated = not torch.equal(ours.running_mean, mean) and not torch.equal(ours.running_var, var)
    assert updated == (where == "after the kernel")
    assert int(ours.num_batches_tracked) == (2 if updated else 1)
