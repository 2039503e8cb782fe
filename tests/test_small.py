"""The small-call path (fastbn.backends.cpu.small): taken where it should be, equal to the full path, and
refusing, for the full path to handle, every call it does not cover."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastbn
from fastbn import _dispatch
from fastbn.backends.cpu import passes, small

SHAPES = [((32, 64), 1), ((8, 16, 14, 14), 1), ((4, 6, 5, 3), -1), ((7, 1, 5), 1), ((9, 3), 1), ((2, 3, 2, 2, 4), 1)]
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ulps(a, b, dtype):
    """Largest distance between a and b in units of the last place of ``dtype`` at b's largest magnitude.

    Norm-wise: an output near zero is a difference of larger values, so its own magnitude says nothing
    about the error of the sums it came from."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    eps = 2.0**-7 if dtype.itemsize == 2 and dtype != np.float16 else float(np.finfo(dtype).eps)  # bfloat16: 8 bits
    scale = max(float(np.max(np.abs(b))), float(np.finfo(np.float32).tiny)) if b.size else 1.0
    return float(np.max(np.abs(a - b)) / (scale * eps)) if a.size else 0.0


@pytest.fixture
def launches(monkeypatch):
    """The parallel kernel launches of the full path, recorded."""
    log = []
    monkeypatch.setattr(passes, "LAUNCH_LOG", log)
    return log


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("name", DTYPES)
def test_small_calls_take_one_kernel_and_match_the_full_path(shape, axis, name, launches):
    dtype = _dtype(name)
    stats = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    channels = shape[axis]
    weight, bias = rng.standard_normal(channels).astype(stats), rng.standard_normal(channels).astype(stats)
    fast_rm, fast_rv = np.zeros(channels, stats), np.ones(channels, stats)
    full_rm, full_rv = fast_rm.copy(), fast_rv.copy()

    y, saved = fastbn.forward(x, weight, bias, running_mean=fast_rm, running_var=fast_rv, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    grads = fastbn.backward(dy, x, weight, saved, axis=axis)
    eval_rm, eval_rv = rng.standard_normal(channels).astype(stats), rng.random(channels).astype(stats)
    y_eval, saved_eval = fastbn.forward(
        x, weight, bias, running_mean=eval_rm, running_var=eval_rv, axis=axis, training=False
    )
    assert launches == [], "a small plain call ran the parallel kernels"

    # The full path, forced by a plan override that changes nothing.
    y_full, saved_full = fastbn.forward(x, weight, bias, running_mean=full_rm, running_var=full_rv, axis=axis, _plan={})
    grads_full = fastbn.backward(dy, x, weight, saved_full, axis=axis, _plan={})
    y_eval_full, saved_eval_full = fastbn.forward(
        x, weight, bias, running_mean=eval_rm, running_var=eval_rv, axis=axis, training=False, _plan={}
    )
    assert launches, "the forced full path launched nothing"

    # The same kernels' code, serially (bit for bit on the machine this was written on; one channel is one
    # SLAB run on both paths). Held to the reordering's bound everywhere, since LLVM may vectorise the two
    # copies of a loop differently on another CPU: an ulp of the float64
    # accumulators, which rounding to the dtype can turn into at most one ulp of the dtype; float16 and
    # bfloat16 input sum in float32 blocks, so their float32 statistics and gradient sums can differ by a few
    # float32 ulps (reordered block sums of up to 256 terms), and their outputs by a few half-precision ulps.
    half = np.dtype(dtype).itemsize == 2
    assert saved[2:] == saved_full[2:] and saved_eval[2:] == saved_eval_full[2:]
    for got, want, kind in [
        (y, y_full, dtype),
        (saved.mean, saved_full.mean, np.dtype(stats)),
        (saved.invstd, saved_full.invstd, np.dtype(stats)),
        (fast_rm, full_rm, np.dtype(stats)),
        (fast_rv, full_rv, np.dtype(stats)),
        (y_eval, y_eval_full, dtype),
        (saved_eval.invstd, saved_eval_full.invstd, np.dtype(stats)),
    ] + [(g, h, np.dtype(stats) if g.ndim == 1 else dtype) for g, h in zip(grads, grads_full)]:
        assert got.shape == want.shape and got.dtype == want.dtype
        # float64 results are the float64 sums themselves: a reordered sum of n terms can differ by a few ulps
        limit = 8.0 if kind == np.float64 or (half and kind == stats) else 2.0 if half else 1.0
        assert _ulps(got, want, kind) <= limit, (got, want)
    # eval mode is elementwise with no reduction: exactly the full path
    assert np.array_equal(np.asarray(y_eval, np.float64), np.asarray(y_eval_full, np.float64))


def _plain(shape=(16, 4), dtype=np.float32):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    return dict(x=x, weight=np.ones(c, np.float32), bias=np.zeros(c, np.float32), rm=np.zeros(c), rv=np.ones(c))


def _read_only_view(a):
    view = a.view()
    view.flags.writeable = False
    return view


def _refused_cases():
    """(name, change to a plain call's arguments) that the small path must leave to the full path."""
    return [
        ("strided x", lambda a: a.update(x=a["x"][::2])),
        ("x a list", lambda a: a.update(x=a["x"].tolist())),
        ("weight float64", lambda a: a.update(weight=a["weight"].astype(np.float64))),
        ("weight strided", lambda a: a.update(weight=np.ones(8, np.float32)[::2])),
        ("weight a list", lambda a: a.update(weight=[1.0] * 4)),
        ("running_mean is weight", lambda a: a.update(rm=a["weight"])),
        ("running_var inside x", lambda a: a.update(rv=a["x"][0])),
        ("running_var read-only", lambda a: (a["rv"].setflags(write=False), None)[1]),
        # a read-only parameter is copied before the kernels' overlap check: its overlap is checked first
        ("running_mean is a read-only weight", lambda a: a.update(weight=_read_only_view(a["rm"]))),
        ("running_var is a read-only bias", lambda a: a.update(bias=_read_only_view(a["rv"]))),
        ("one value per channel", lambda a: a.update(x=a["x"][:1])),
        ("momentum out of range", lambda a: a.update(momentum=1.5)),
        ("momentum an int", lambda a: a.update(momentum=0)),
        ("eps zero", lambda a: a.update(eps=0.0)),
        ("axis 0", lambda a: a.update(axis=0)),
        ("an integer dtype", lambda a: a.update(x=a["x"].astype(np.int32))),
        ("a matrix", lambda a: a.update(x=np.asmatrix(a["x"]))),
        ("only running_mean", lambda a: a.update(rv=None)),
        ("eval, negative running_var", lambda a: a.update(training=False, rv=-np.ones(4, np.float32))),
    ]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("name,change", _refused_cases(), ids=[c[0] for c in _refused_cases()])
def test_what_the_small_path_refuses_the_full_path_decides(name, change):
    args = dict(_plain(), momentum=0.1, eps=1e-5, axis=1, training=True)
    args["rm"], args["rv"] = np.zeros(4, np.float32), np.ones(4, np.float32)
    change(args)
    call = (args["x"], args["weight"], args["bias"], args["rm"], args["rv"], args["training"])
    before = [None if a is None else np.array(a, copy=True) for a in call[:5]]
    assert small.forward(*call, args["momentum"], args["eps"], args["axis"]) is None
    for a, b in zip(call[:5], before):  # a refusal writes nothing
        assert a is None or np.array_equal(np.asarray(a), b)

    def run(**plan):
        return fastbn.forward(
            args["x"],
            args["weight"],
            args["bias"],
            running_mean=args["rm"],
            running_var=args["rv"],
            training=args["training"],
            momentum=args["momentum"],
            eps=args["eps"],
            axis=args["axis"],
            **plan,
        )

    try:
        want = run(_plan={})
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)) as got:
            run()
        assert str(got.value) == str(exc)
    else:
        y, _saved = run()
        np.testing.assert_allclose(np.asarray(y), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_inputs_at_the_size_limit_run_the_parallel_kernels(monkeypatch, launches):
    x = np.ones((16, 4), np.float32)
    monkeypatch.setattr(small, "_limit", lambda: x.nbytes)
    fastbn.forward(x)
    assert launches
    launches.clear()
    monkeypatch.setattr(small, "_limit", lambda: x.nbytes + 1)
    fastbn.forward(x)
    assert launches == []


def _above_the_limit(inner, itemsize):
    """The outer size that makes an input of ``inner`` elements per sample 1.2 times the serial limit."""
    return -(-(small._limit() * 6 // 5) // (inner * itemsize))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC", "channels_last"])
@pytest.mark.parametrize("name", ["float32", "float16"])
def test_large_plain_calls_skip_the_full_paths_checks_and_match_it_bit_for_bit(layout, name, launches, monkeypatch):
    """Above the serial limit a plain call still takes the lane (its checks, then the full path's own passes
    with the plan the full path would choose, on the threading layer): bit for bit the full path's results."""
    dtype = np.dtype(name)
    inner, C = {"NCHW": (8 * 32 * 32, 8), "NHWC": (16 * 16 * 8, 8), "NC": (64, 64), "channels_last": (2048, 8)}[layout]
    n = _above_the_limit(inner, dtype.itemsize)
    shape, axis = {
        "NCHW": ((n, 8, 32, 32), 1),
        "NHWC": ((n, 16, 16, 8), -1),
        "NC": ((n, 64), 1),
        "channels_last": ((n, 16, 16, 8), -1),  # moved to NCHW order below: torch's channels_last
    }[layout]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "channels_last":
        x, dy, axis = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1), 1
    weight, bias = rng.random(C).astype(np.float32) + 0.5, rng.standard_normal(C).astype(np.float32)
    eval_rm, eval_rv = rng.standard_normal(C).astype(np.float32), rng.random(C).astype(np.float32)

    def run(plan):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, saved = fastbn.forward(x, weight, bias, running_mean=rm, running_var=rv, axis=axis, _plan=plan)
        grads = fastbn.backward(dy, x, weight, saved, axis=axis, _plan=plan)
        y_eval, saved_eval = fastbn.forward(
            x, weight, bias, running_mean=eval_rm, running_var=eval_rv, training=False, axis=axis, _plan=plan
        )
        return [y, saved.mean, saved.invstd, rm, rv, *grads, y_eval, saved_eval.mean, saved_eval.invstd]

    full = run({})  # a plan override that changes nothing: the full path
    full_launches = list(launches)
    launches.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("a large plain call took the full path")

    monkeypatch.setattr(_dispatch, "prepare", refuse)
    lane = run(None)
    assert launches == full_launches  # the same kernels, with the same plans
    for got, want in zip(lane, full):
        assert got.dtype == want.dtype and got.shape == want.shape and got.strides == want.strides
        got, want = (np.ascontiguousarray(a).view(np.uint8) for a in (got, want))  # the bits
        np.testing.assert_array_equal(got, want)


def test_backward_refuses_what_it_does_not_cover(launches):
    a = _plain()
    x = a["x"]
    _y, saved = fastbn.forward(x, a["weight"], a["bias"])
    dy = np.ones_like(x)
    for changed in [
        saved._replace(batch_stats=False),  # eval: the full path
        saved._replace(activation="relu"),
        saved._replace(count=np.int64(16)),
        saved._replace(mean=saved.mean.astype(np.float64)),
    ]:
        launches.clear()
        with contextlib.suppress(TypeError, ValueError):
            fastbn.backward(dy, x, a["weight"], changed, y=x)
        assert launches or changed.mean.dtype == np.float64
    launches.clear()
    dx, _dweight, dbias = fastbn.backward(np.broadcast_to(np.float32(1), x.shape), x, a["weight"], saved)
    assert launches == [] and np.allclose(dbias, 16) and np.allclose(dx, 0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^saved: came from forward on shape"):
        fastbn.backward(dy[:8], x[:8], a["weight"], saved)


def test_torch_lane_matches_torch_and_keeps_its_checks(launches):
    torch = pytest.importorskip("torch")
    import fastbn.torch as ft

    rng = np.random.default_rng(3)
    x0 = torch.from_numpy(rng.standard_normal((32, 8)).astype(np.float32))
    w0, b0 = torch.rand(8), torch.rand(8)
    results = []
    for fn in (torch.nn.functional.batch_norm, ft.batch_norm):
        x = x0.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = torch.zeros(8), torch.ones(8)
        version = rm._version
        y = fn(x, rm, rv, w, b, training=True)
        (y * torch.arange(8.0)).sum().backward()
        results.append((y.detach(), x.grad, w.grad, b.grad, rm, rv))
    assert launches == [], "fastbn.torch's small lane ran the parallel kernels"
    assert rm._version > version  # updated in place, as the general path does: views and autograd see it
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    x = x0.clone().requires_grad_()
    y = ft.batch_norm(x, None, None, training=True)
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # a double backward leaves the lane for the general path, and is torch's
    x = x0.clone().double().requires_grad_()
    part = x[:6, :3].detach().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: ft.batch_norm(t, None, None, training=True), (part,))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        ft.batch_norm(x, None, None, training=False)


@pytest.mark.parametrize("name", DTYPES)
def test_small_channels_last_calls_take_the_lane_in_rows_order(name, launches):
    """An array that is C-contiguous once its channel axis is last (a channels-last torch tensor in NCHW order)
    is a plain call: outputs in the same memory order as the full path's, within the serial lane's ulps."""
    dtype = _dtype(name)
    stats = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(8)
    x = np.moveaxis((rng.standard_normal((4, 5, 6, 3)) * 3 + 1).astype(dtype), -1, 1)
    dy = np.moveaxis(rng.standard_normal((4, 5, 6, 3)).astype(dtype), -1, 1)
    assert not x.flags.c_contiguous
    weight = rng.standard_normal(3).astype(stats)
    results = []
    for plan in (None, {}):
        rm, rv = np.zeros(3, stats), np.ones(3, stats)
        y, saved = fastbn.forward(x, weight, None, running_mean=rm, running_var=rv, _plan=plan)
        results.append((y, rm, rv, *fastbn.backward(dy, x, weight, saved, _plan=plan)))
        if plan is None:
            assert launches == [], "a small channels-last call ran the parallel kernels"
    half = dtype.itemsize == 2
    for got, want in zip(*results):
        assert got.strides == want.strides and got.dtype == want.dtype
        kind = np.dtype(stats) if got.ndim == 1 else dtype
        limit = 8.0 if kind == np.float64 or (half and kind == stats) else 2.0 if half else 1.0
        assert _ulps(got, want, kind) <= limit


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
def test_torch_lane_takes_bfloat16_tensors_as_int16_views(memory_format, monkeypatch):
    """bfloat16 tensors (float32 parameters and statistics, torch's mixed precision) take fastbn.torch's lane,
    viewed through int16 without a copy, and come back as bfloat16 tensors in the input's memory format: the
    general path's values (forced by patching the lane away) within the half types' reordering bound, and
    torch's within its rounding."""
    torch = pytest.importorskip("torch")
    import fastbn.torch as ft
    from fastbn.torch import _small

    fmt = getattr(torch, memory_format)
    rng = np.random.default_rng(4)
    x0 = torch.from_numpy(rng.standard_normal((4, 6, 5, 3)).astype(np.float32) * 3 + 1).bfloat16()
    x0 = x0.contiguous(memory_format=fmt)
    w0, b0 = torch.rand(6), torch.rand(6)
    g = torch.from_numpy(rng.standard_normal((4, 6, 5, 3)).astype(np.float32)).bfloat16()
    took = []
    lane = _small.batch_norm

    def watched(*args):
        result = lane(*args)
        took.append(result is not None)
        return result

    results = {}
    for name in ("lane", "general", "torch"):
        monkeypatch.setattr(_small, "batch_norm", watched if name == "lane" else lambda *args: None)
        fn = torch.nn.functional.batch_norm if name == "torch" else ft.batch_norm
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = torch.zeros(6), torch.ones(6)
        y = fn(x, rm, rv, w, b, training=True)
        (y.float() * g.float()).sum().backward()
        y_eval = fn(x.detach(), rm, rv, w, b, training=False)
        results[name] = (y.detach(), x.grad, w.grad, b.grad, rm, rv, y_eval)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
        assert x.grad.dtype == torch.bfloat16 and x.grad.is_contiguous(memory_format=fmt)
    assert took == [True, True], "the lane refused a plain bfloat16 call"
    # The lane runs the serial copies of the general path's kernels: for the half types, their float32
    # block sums may be vectorised differently (as test_small_calls_take_one_kernel_and_match_the_full_path
    # allows), so the float32 results are held to a few float32 ulps and the bfloat16 ones to two of theirs.
    # (Measured: one fresh-clone CI run got running means a float32 ulp apart; before the kernels borrowed
    # their arguments, float16 lanes and full paths differed so on 24 of 296 random SLAB shapes.)
    bfloat16 = _dtype("bfloat16")
    for got, want in zip(results["lane"], results["general"]):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        if got.dtype == torch.bfloat16:
            assert _ulps(got.detach().float().numpy(), want.detach().float().numpy(), bfloat16) <= 2.0, (got, want)
        else:
            assert _ulps(got.detach().numpy(), want.detach().numpy(), np.dtype(np.float32)) <= 8.0, (got, want)
    for got, want in zip(results["lane"], results["torch"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=2e-2)
