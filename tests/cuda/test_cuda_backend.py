"""The CUDA backend's own paths: launch shapes, memory layouts, device-side state, result kinds,
bad input, and the kernel signatures that ``python -m fastbn ptx`` compiles."""

from __future__ import annotations

import inspect
import sys
import types

import numba
import numpy as np
import pytest

import fastbn
from fastbn.backends import Backend, load
from fastbn.backends.cuda import plan, target, views
from fastbn.backends.cuda.ops import BACKEND

from gpu_arrays import ForeignGPUArray, forbid_transfers, gpu, host, numba_device, readonly_gpu
from oracle import oracle_backward, oracle_forward, oracle_moments
from strategies import (
    assert_close,
    backward_scales,
    mean_scale,
    output_tol,
    place,
    stats_tol,
    var_scale,
    y_scale,
)

DTYPES = (np.float16, np.float32, np.float64)


def _launched(launches):
    return [name for name, *_ in launches]


def _check_forward_backward(x, axis, dtype):
    """Training forward, moments and backward of GPU arrays against the oracle."""
    rng = np.random.default_rng(7)
    x = x.astype(dtype) if x.dtype != dtype else x
    y, saved = fastbn.forward(gpu(x), axis=axis)
    o = oracle_forward(x, axis=axis)
    st_tol = stats_tol(dtype)
    scale = y_scale(x, o.mean, o.invstd, None, None, axis, st_tol)
    assert_close(host(y), o.y, output_tol(dtype), scale=scale, what="y")
    mean, var = fastbn.moments(gpu(x), axis=axis)
    o_mean, o_var = oracle_moments(x, axis)
    assert_close(host(mean), o_mean, st_tol, scale=mean_scale(x, o_mean, axis), what="mean")
    assert_close(host(var), o_var, st_tol, scale=var_scale(x, o_mean, o_var, axis, st_tol), what="var")
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dweight, dbias = fastbn.backward(gpu(dy), gpu(x), None, saved, axis=axis)
    e_dx, e_dweight, e_dbias = oracle_backward(dy, x, None, o.mean, o.invstd, True, axis)
    dx_scale, dweight_scale, dbias_scale = backward_scales(x, dy, o.mean, o.invstd, None, axis, st_tol)
    assert_close(host(dx), e_dx, output_tol(dtype), scale=dx_scale, what="dx")
    assert_close(host(dweight), e_dweight, st_tol, scale=dweight_scale, what="dweight")
    assert_close(host(dbias), e_dbias, st_tol, scale=dbias_scale, what="dbias")


# ------------------------------------------------------- reduction paths ---
@pytest.mark.parametrize(
    "shape, axis, kernel, block",
    [
        ((12, 2, 25), 1, "stats_slab", (64, 1)),  # 300 elements per channel: several blocks per channel
        ((3, 2, 1, 101), 1, "stats_slab", (64, 1)),  # long rows, a thread's elements cross them rarely
        ((300, 3), 1, "stats_rows", (4, 16)),  # small C: 4 channel slots by 16 rows
        ((60, 40), -1, "stats_rows", (32, 2)),  # C > 32: two tiles of 32 channels
    ],
    ids=["slab", "slab-long-rows", "rows-small-C", "rows-two-tiles"],
)
def test_multi_warp_and_multi_block_reductions(shape, axis, kernel, block, small_launches, launches):
    """Two warps per block (shared-memory merge) and several blocks per channel (partials merged per channel)."""
    small_launches.THREADS_PER_BLOCK = 64
    small_launches.ITEMS_PER_THREAD = 1
    small_launches.MAX_SPLITS = 4  # and so each block loops over a longer chunk
    x = np.random.default_rng(0).normal(5.0, 2.0, shape)
    _check_forward_backward(x, axis, np.float32)
    stats = [(grid, block) for name, grid, block, _ in launches if name == kernel]
    assert stats, _launched(launches)
    grid, launched_block = stats[0]
    assert grid[1] == 4 and launched_block == block, (grid, launched_block)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_split_capped_by_max_splits(dtype, small_launches, launches):
    """MAX_SPLITS bounds the blocks per channel; each block then covers a bigger chunk."""
    small_launches.MAX_SPLITS = 2
    x = np.random.default_rng(1).normal(-3.0, 0.5, (40, 2, 5))
    _check_forward_backward(x, 1, dtype)
    grids = [grid for name, grid, _, _ in launches if name in ("stats_slab", "backward_reduce_slab")]
    assert grids and all(grid[1] == 2 for grid in grids)


# ---------------------------------------------------------- memory layouts ---
LAYOUT_CASES = [
    ("contiguous", ()),
    ("channels_last", ()),
    ("transposed", (2, 0, 3, 1)),
    ("strided", (3, -2)),
]


@pytest.mark.parametrize("layout", LAYOUT_CASES, ids=[kind for kind, _ in LAYOUT_CASES])
def test_layouts(layout, launches):
    """Channel slab, channels-last and gathered inputs; channels-last output for channels-last input."""
    values = np.random.default_rng(2).normal(1.0, 3.0, (3, 4, 2, 3))
    x = place(values, np.float32, layout, 1)
    y, _ = fastbn.forward(gpu(x), axis=1)
    expected = {"contiguous": "stats_slab", "channels_last": "stats_rows"}.get(layout[0])
    names = _launched(launches)
    if expected:
        assert expected in names and "gather" not in names, names
    else:
        assert "gather" in names, names
    y_strides = views.byte_strides(y)
    if layout[0] == "channels_last":
        assert y_strides == tuple(np.moveaxis(np.empty((3, 2, 3, 4), np.float32), -1, 1).strides)
    else:
        assert y_strides == np.empty(x.shape, np.float32).strides
    _check_forward_backward(x, 1, np.float32)


def test_dy_in_another_layout_than_x(launches):
    x = np.random.default_rng(3).normal(size=(4, 3, 5)).astype(np.float32)
    _, saved = fastbn.forward(gpu(x))
    dy = np.asfortranarray(np.random.default_rng(4).normal(size=x.shape).astype(np.float32))
    dx, _, _ = fastbn.backward(gpu(dy), gpu(x), None, saved)
    expected, _, _ = fastbn.backward(dy, x, None, fastbn.forward(x)[1])
    assert "gather" in _launched(launches)
    np.testing.assert_allclose(host(dx), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ state on the device ---
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_running_stats_of_numba_device_arrays_are_updated_in_place(dtype):
    rng = np.random.default_rng(5)
    sd = np.float64 if dtype == np.float64 else np.float32
    x = rng.normal(2.0, 1.5, (6, 3, 4)).astype(dtype)
    rm0, rv0 = rng.normal(size=3).astype(sd), rng.uniform(0.5, 2, 3).astype(sd)
    rm, rv = numba_device(rm0), numba_device(rv0)
    y, _saved = fastbn.forward(numba_device(x), running_mean=rm, running_var=rv, momentum=0.3)
    assert target.is_device_array(y)
    o = oracle_forward(x, running_mean=rm0, running_var=rv0, momentum=0.3)
    tol = stats_tol(dtype)
    assert_close(host(rm), o.running_mean, tol, scale=np.abs(rm0) + mean_scale(x, o.mean, 1), what="running_mean")
    assert_close(
        host(rv),
        o.running_var,
        tol,
        scale=np.abs(rv0) + 2 * var_scale(x, o.mean, 1 / o.invstd**2, 1, tol),
        what="running_var",
    )


def test_eval_saves_a_copy_of_the_running_mean():
    x = np.random.default_rng(6).normal(size=(5, 2, 3)).astype(np.float32)
    rm, rv = np.array([0.5, -1.0], np.float32), np.array([2.0, 0.5], np.float32)
    _, saved = fastbn.forward(gpu(x), running_mean=gpu(rm), running_var=gpu(rv), training=False)
    assert not saved.batch_stats
    rm[:] = 100.0
    np.testing.assert_array_equal(host(saved.mean), [0.5, -1.0])


def test_nan_stays_in_its_channel():
    x = np.random.default_rng(7).normal(size=(6, 3, 4)).astype(np.float32)
    x[2, 1, 3] = np.nan
    y, saved = fastbn.forward(gpu(x))
    y, mean = host(y), host(saved.mean)
    assert np.isnan(y[:, 1]).all() and np.isnan(mean[1])
    assert np.isfinite(y[:, [0, 2]]).all() and np.isfinite(mean[[0, 2]]).all()


def test_mean_far_above_spread_keeps_float32_variance_accurate():
    """The per-channel pivot: float32 accumulation, float64-quality variance (mean / spread = 1e5)."""
    x = (1e5 + np.random.default_rng(8).standard_normal((64, 2, 16))).astype(np.float32)
    for axis, data in ((1, x), (-1, np.ascontiguousarray(np.moveaxis(x, 1, -1)))):
        _, var = fastbn.moments(gpu(data), axis=axis)
        _, o_var = oracle_moments(data, axis)
        np.testing.assert_allclose(host(var), o_var, rtol=1e-5)


@pytest.mark.parametrize("layout", ["slab", "rows"])
def test_extreme_values(layout, small_launches):
    """As on the CPU (tests/test_numerics.py): a constant channel of 1e200s has variance 0 (the pivot);
    +inf among finite values makes the mean +inf, as torch's sum / n, not Welford's inf - inf NaN, also
    when the pivot itself (the first element) is inf; float32 values 1e19 apart (variance 2.5e37, finite
    in float32, though a block's sum of squared deviations would overflow float32) keep a finite
    variance, since the summaries are variances, not sums of squares."""

    def moments(x):
        data = x if layout == "slab" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
        mean, var = fastbn.moments(gpu(data), axis=1 if layout == "slab" else -1)
        return host(mean), host(var)

    constant = np.full((5, 2, 7), 1e200)
    constant[:, 1] = np.random.default_rng(3).standard_normal((5, 7))
    mean, var = moments(constant)
    assert mean[0] == 1e200 and var[0] == 0.0 and np.isfinite(var[1])
    x = np.random.default_rng(4).standard_normal((5, 3, 7)).astype(np.float32)
    x[2, 0, 3] = np.inf
    x[0, 2, 0] = np.inf  # the pivot of channel 2
    mean, var = moments(x)
    assert mean[0] == np.inf and mean[2] == np.inf and np.isfinite(mean[1])
    assert np.isnan(var[[0, 2]]).all() and np.isfinite(var[1])
    wide = np.zeros((6, 1, 10), np.float32)
    wide[:, :, ::2] = 1e19
    mean, var = moments(wide)
    np.testing.assert_allclose(mean, 5e18, rtol=1e-6)
    np.testing.assert_allclose(var, 2.5e37, rtol=1e-5)


def test_a_negative_device_variance_gives_nan_in_its_channel_only():
    """Device variances are not checked on the host (reading them would synchronise the device inside
    the call; host arrays are refused, tests/test_robustness.py): a negative one makes its own channel
    NaN, as PyTorch's CUDA kernels do, and touches nothing else."""
    x = np.random.default_rng(9).standard_normal((4, 3, 5)).astype(np.float32)
    mean = np.zeros(3, np.float32)
    var = np.array([1.0, -0.5, 2.0], np.float32)
    y = host(fastbn.normalize(gpu(x), gpu(mean), gpu(var)))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    running_var = var.copy()  # gpu() shares this memory, so the host copy shows the device's values
    y, _ = fastbn.forward(gpu(x), running_mean=gpu(mean.copy()), running_var=gpu(running_var), training=False)
    y = host(y)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    np.testing.assert_array_equal(running_var, var)


def test_no_host_transfers(monkeypatch):
    """forward, backward, moments and normalize never copy between host and device."""
    x = np.random.default_rng(9).normal(size=(4, 3, 5)).astype(np.float32)
    dy = np.ones_like(x)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    forbid_transfers(monkeypatch)
    y, saved = fastbn.forward(gpu(x), gpu(w), gpu(b), running_mean=gpu(rm), running_var=gpu(rv))
    fastbn.backward(gpu(dy), gpu(x), gpu(w), saved)
    fastbn.moments(gpu(x))
    fastbn.normalize(gpu(x), saved.mean, gpu(rv), gpu(w), gpu(b))
    monkeypatch.undo()
    assert np.isfinite(host(y)).all()


# ------------------------------------------------------------ result kinds ---
def test_numba_device_arrays_stay_numba_device_arrays():
    x = np.random.default_rng(10).normal(size=(4, 2, 3)).astype(np.float32)
    y, saved = fastbn.forward(numba_device(x))
    results = [
        y,
        saved.mean,
        saved.invstd,
        *fastbn.moments(numba_device(x)),
        *fastbn.backward(numba_device(x), numba_device(x), None, saved),
    ]
    assert all(target.is_device_array(r) for r in results)


_SIMULATOR_ONLY = pytest.mark.skipif(
    not target.SIMULATOR, reason="a host array stands for device memory: simulator only (test_cuda_torch.py on a GPU)"
)


@_SIMULATOR_ONLY
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_results_come_back_as_the_callers_framework(framework, monkeypatch):
    """A CuPy array gives CuPy arrays, a torch tensor gives tensors on its device: zero-copy, from sys.modules."""
    calls = []
    stub = types.ModuleType(framework)
    if framework == "torch":
        stub.as_tensor = lambda array, device: calls.append((array, device)) or ("tensor", array, device)
    else:
        stub.asarray = lambda array: calls.append((array, None)) or ("cupy", array)
    foreign_type = type("ForeignArray", (ForeignGPUArray,), {"__module__": f"{framework}._core", "device": "cuda:1"})
    # The framework's array class, as fastbn._frameworks recognises it (torch.Tensor, cupy.ndarray).
    setattr(stub, "Tensor" if framework == "torch" else "ndarray", foreign_type)
    monkeypatch.setitem(sys.modules, framework, stub)

    x = np.random.default_rng(11).normal(size=(4, 2, 3)).astype(np.float32)
    y, _saved = fastbn.forward(foreign_type(x))
    assert y[0] == ("tensor" if framework == "torch" else "cupy")
    assert target.is_device_array(y[1])  # converted from the backend's own device array
    if framework == "torch":
        assert y[2] == "cuda:1"
    _mean, _var = fastbn.moments(foreign_type(x))
    assert len(calls) == 3


@_SIMULATOR_ONLY
def test_restorer_imports_no_framework():
    before = set(sys.modules)
    restore = BACKEND.restorer(ForeignGPUArray(np.zeros((2, 2), np.float32)))
    assert restore("anything") == "anything" and set(sys.modules) == before


# -------------------------------------------------------------- conversion ---
def test_to_device_names_the_argument():
    with pytest.raises(TypeError, match=r"^weight: expected a GPU array"):
        BACKEND.to_backend(np.zeros(3), "weight")

    class Grad:
        @property
        def __cuda_array_interface__(self):  # what a torch tensor that requires grad does
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    with pytest.raises(TypeError, match=r"^running_mean: cannot be used as a GPU array"):
        BACKEND.to_backend(Grad(), "running_mean")


def test_saved_statistics_must_be_on_the_device(launches):
    x = np.random.default_rng(12).normal(size=(4, 2, 3)).astype(np.float32)
    _, host_saved = fastbn.forward(x)
    with pytest.raises(TypeError, match=r"^saved.mean: expected a GPU array"):
        fastbn.backward(gpu(np.ones_like(x)), gpu(x), None, host_saved)
    assert launches == []


def test_backend_argument(launches):
    x = np.random.default_rng(13).normal(size=(4, 2, 3)).astype(np.float32)
    assert target.is_device_array(fastbn.forward(gpu(x), backend="cuda")[0])
    with pytest.raises(ValueError, match=r"^x: is a GPU array but this call runs on the CPU"):
        fastbn.forward(gpu(x), backend="cpu")
    with pytest.raises(ValueError, match=r"^x: is a host array but this call runs on the GPU"):
        fastbn.moments(x, backend="cuda")
    with pytest.raises(ValueError, match=r"^weight: is a host array but this call runs on the GPU"):
        fastbn.forward(gpu(x), np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"^running_var: is a host array"):
        fastbn.forward(gpu(x), running_mean=gpu(np.zeros(2, np.float32)), running_var=np.ones(2, np.float32))
    names = _launched(launches)
    assert names.count("normalize") == 1, names  # only the first call ran


# ------------------------------------------------------- backend interface ---
def _protocol_methods():
    return [name for name, value in vars(Backend).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_backend_implements_the_protocol_with_its_signatures():
    """fastbn.backends.load("cuda") is the ops module's BACKEND, and every method of the Backend
    protocol has the protocol's exact signature (names, defaults, keyword-only markers)."""
    assert load("cuda") is BACKEND
    assert BACKEND.name == "cuda" and BACKEND.sync is None
    methods = _protocol_methods()
    assert "forward_batch" in methods and "fold" in methods
    for name in methods:
        expected = inspect.signature(getattr(Backend, name))
        got = inspect.signature(getattr(type(BACKEND), name))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in expected.parameters.values()
        ], name


class _OneProcess:
    """Collectives of a single process."""

    def allgather(self, vector):
        return np.asarray(vector)[None]

    def allreduce_sum(self, vector):
        return np.asarray(vector)


def test_synchronised_batch_norm_is_refused_before_any_launch(launches):
    """The CUDA backend has no synchronised pieces (sync is None): process_group is refused first."""
    running = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"^process_group: not supported on the cuda backend yet$"):
        fastbn.forward(
            gpu(np.ones((4, 2, 3), np.float32)),
            running_mean=gpu(running),
            running_var=gpu(running + 1),
            process_group=_OneProcess(),
        )
    assert launches == []


def test_bfloat16_is_refused_before_any_launch(launches):
    """Only the CPU kernels take bfloat16: a bfloat16 GPU array, foreign or numba's, is a TypeError
    naming the argument, raised when the arrays are converted, before any check or launch."""
    from strategies import BFLOAT16

    x = np.ones((4, 2, 3), BFLOAT16)
    running = np.zeros(2, np.float32)
    for array in (gpu(x), numba_device(x)):
        with pytest.raises(TypeError, match=r"^x: bfloat16 is not supported on the CUDA backend"):
            fastbn.forward(array, running_mean=gpu(running), running_var=gpu(running + 1))
        with pytest.raises(TypeError, match=r"^dy: bfloat16 is not supported on the CUDA backend"):
            fastbn.backward(array, gpu(np.ones((4, 2, 3), np.float32)), None, None)
    with pytest.raises(TypeError, match=r"^running_var: bfloat16 is not supported on the CUDA backend"):
        fastbn.forward(
            gpu(np.ones((4, 2, 3), np.float32)), running_mean=gpu(running), running_var=gpu(running.astype(BFLOAT16))
        )
    assert launches == []
    assert running.tobytes() == np.zeros(2, np.float32).tobytes()


def test_plan_override_is_refused(launches):
    x = BACKEND.to_backend(gpu(np.ones((4, 2, 3), np.float32)), "x")
    dtype = np.dtype(np.float32)
    calls = [
        lambda: BACKEND.forward_batch(x, 1, dtype, None, None, 1e-5, None, None, 0.1, False, plan={}),
        lambda: BACKEND.forward_eval(x, 1, dtype, None, None, 1e-5, x[0, :, 0], x[0, :, 0], plan={}),
        lambda: BACKEND.normalize(x, 1, dtype, x[0, :, 0], x[0, :, 0], None, None, 1e-5, plan={}),
        lambda: BACKEND.moments(x, 1, dtype, plan={}),
        lambda: BACKEND.backward(x, x, 1, dtype, None, x[0, :, 0], x[0, :, 0], True, plan={}),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^_plan: only the CPU backend takes a plan override$"):
            call()
    assert launches == []


def test_from_host_copies_to_the_device():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not contiguous
    device = BACKEND.from_host(values)
    assert target.is_device_array(device)
    np.testing.assert_array_equal(host(device), values)
    values[:] = -1  # a copy: the host array's later changes do not reach it
    assert (host(device) >= 0).all()


# --------------------------------------------------------------- signatures ---
def test_every_launch_has_a_signature_that_ptx_compiles(launches):
    """The argument types of every launch (numba.typeof, as the dispatcher types them) are in
    fastbn.backends.cuda.plan.signatures, the list that ``python -m fastbn ptx`` compiles."""
    rng = np.random.default_rng(14)
    for dtype in DTYPES:
        sd = np.float64 if dtype == np.float64 else np.float32
        for layout in LAYOUT_CASES:
            x = place(rng.normal(size=(3, 2, 2, 3)), dtype, layout, 1)
            w, b = rng.uniform(0.5, 1, 2).astype(sd), rng.normal(size=2).astype(sd)
            rm, rv = np.zeros(2, sd), np.ones(2, sd)
            del launches[:]
            _, saved = fastbn.forward(gpu(x), gpu(w), gpu(b), running_mean=gpu(rm), running_var=gpu(rv))
            fastbn.forward(gpu(x), running_mean=gpu(rm), running_var=gpu(rv), training=False)
            fastbn.backward(gpu(x), gpu(x), gpu(w), saved)
            fastbn.backward(gpu(x), gpu(x), None, saved._replace(batch_stats=False))
            fastbn.moments(gpu(x))
            fastbn.normalize(gpu(x), gpu(rm), gpu(rv))
            compiled = {(name, argtypes) for name, _, argtypes in plan.signatures(dtype)}
            for name, _, _, args in launches:
                argtypes = tuple(numba.typeof(arg) for arg in args)
                assert (name, argtypes) in compiled, (np.dtype(dtype).name, layout, name, argtypes)
            assert {name for name, *_ in launches} <= {name for name, _ in compiled}


# --------------------------------------------------------------- bad input ---
def _to_gpu(value):
    if isinstance(value, np.ndarray):
        return gpu(value) if value.flags.writeable else readonly_gpu(value)
    if isinstance(value, fastbn.Saved):
        return value._replace(mean=_to_gpu(value.mean), invstd=_to_gpu(value.invstd))
    return value


def _error_cases():
    import test_errors as errors

    for dtype, dtype_id in zip(errors.DTYPES, errors.DTYPE_IDS):
        if dtype_id == "bfloat16":  # refused as a whole on the GPU (test_bfloat16_is_refused_before_any_launch)
            continue
        for case_id, exc, argument, change in errors.FORWARD_ERRORS:

            def call(change=change, dtype=dtype):
                args = change(errors.good_forward_args(dtype))
                return fastbn.forward, (args.pop("x"), args.pop("weight"), args.pop("bias")), args

            yield pytest.param(call, exc, argument, id=f"forward-{case_id}-{dtype_id}")
        for case_id, exc, argument, change in errors.BACKWARD_ERRORS:
            if case_id == "saved-invstd-negative":  # read on the host only, as the variances above
                continue

            def call(change=change, dtype=dtype):
                args = change(errors._forward_for_backward(dtype))
                return (
                    fastbn.backward,
                    (args["dy"], args["x"], args["weight"], args["saved"]),
                    dict(axis=args["axis"], y=args.get("y")),
                )

            yield pytest.param(call, exc, argument, id=f"backward-{case_id}-{dtype_id}")
        for case_id, exc, argument, change in errors.NORMALIZE_ERRORS:
            if case_id == "var-negative":  # read on the host only (test_a_negative_device_variance_gives_nan...)
                continue

            def call(change=change, dtype=dtype):
                args = change(errors.good_normalize_args(dtype))
                positional = tuple(args.pop(key) for key in ("x", "mean", "var", "weight", "bias"))
                return fastbn.normalize, positional, args

            yield pytest.param(call, exc, argument, id=f"normalize-{case_id}-{dtype_id}")
    for case_id, exc, argument, kwargs in errors.MOMENTS_ERRORS:

        def call(kwargs=kwargs):
            kwargs = dict(kwargs)
            return fastbn.moments, (kwargs.pop("x"),), kwargs

        yield pytest.param(call, exc, argument, id=f"moments-{case_id}")


@pytest.mark.parametrize("make_call, exc, argument", list(_error_cases()))
def test_bad_input_is_rejected_before_any_kernel(make_call, exc, argument, launches):
    """tests/test_errors.py's bad inputs, as GPU arrays: the same exception, naming the same
    argument, raised before the first kernel launch; running statistics untouched."""
    from test_errors import ONE_VALUE, names

    function, args, kwargs = make_call()
    args, kwargs = [_to_gpu(a) for a in args], {k: _to_gpu(v) for k, v in kwargs.items()}
    device_buffers = [a for a in (*args, *kwargs.values()) if target.is_device_array(a)]
    before = [host(a).tobytes() for a in device_buffers]
    pattern = argument if argument == ONE_VALUE else names(argument)
    with pytest.raises(exc, match=pattern):
        function(*args, **kwargs)
    assert launches == []
    assert [host(a).tobytes() for a in device_buffers] == before


def test_running_stats_sharing_memory_are_rejected(launches):
    x = np.random.default_rng(15).normal(size=(4, 2, 3)).astype(np.float32)
    stats = gpu(np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"^running_var: must not share memory with running_mean"):
        fastbn.forward(gpu(x), running_mean=stats, running_var=stats)
    assert launches == []


# ------------------------------------------------ Numba's own arrays, contexts ---
def test_numbas_own_device_arrays_take_the_gpu_path(launches):
    """``cuda.to_device`` arrays (the simulator's have no interface of their own) run the CUDA kernels."""
    x = np.random.default_rng(16).normal(size=(6, 2, 3)).astype(np.float32)
    y, saved = fastbn.forward(target.cuda.to_device(x))
    assert target.is_device_array(y) and target.is_device_array(saved.mean)
    assert "stats_slab" in _launched(launches)
    np.testing.assert_allclose(host(y), fastbn.forward(x)[0], rtol=1e-5, atol=1e-5)


def test_each_call_runs_in_a_context_of_its_own_and_leaves_none_behind():
    from fastbn.backends.cuda import context

    x = gpu(np.ones((4, 2), np.float32))
    bound = BACKEND.for_call([("x", x)])
    seen = []
    original = BACKEND.moments

    def moments(*args, **kwargs):
        seen.append(context.current())
        return original(*args, **kwargs)

    BACKEND.moments = moments
    try:
        mean, _ = bound.moments(bound.to_backend(x, "x"), 1, np.float32)
    finally:
        del BACKEND.moments
    assert seen and seen[0] is bound._context and seen[0].framework == "numba"
    assert context.current() is context._DEFAULT
    np.testing.assert_array_equal(host(mean), [1, 1])


# -------------------------------------------------- eval backward, one pass ---
@pytest.mark.parametrize("layout", ["slab", "rows"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dresidual", [False, True], ids=["", "dres"])
def test_eval_backward_is_one_fused_pass(layout, relu, dresidual, small_launches, launches):
    """Eval-mode backward (batch_stats False) writes dx = g * invstd * weight in the reduction that sums g
    and (x - mean) g, g masked by y > 0 behind a ReLU: no elementwise kernel, several blocks per channel,
    and dx, dweight, dbias, dres as the formulas give them."""
    rng = np.random.default_rng(21)
    x = rng.normal(2.0, 3.0, (20, 3, 7)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    axis = 1
    if layout == "rows":  # (N, C): channels contiguous
        x, dy, axis = np.moveaxis(x, 1, -1).reshape(-1, 3).copy(), np.moveaxis(dy, 1, -1).reshape(-1, 3).copy(), 1
    channel_axis = axis % x.ndim
    others = tuple(d for d in range(x.ndim) if d != channel_axis)
    shape = [1] * x.ndim
    shape[channel_axis] = 3
    mean = rng.normal(size=3).astype(np.float32)
    invstd = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    y = np.where(rng.random(x.shape) < 0.5, 1.0, -1.0).astype(np.float32) if relu else None
    del launches[:]
    dx, dweight, dbias, dres = BACKEND.backward(
        numba_device(dy),
        numba_device(x),
        axis,
        np.dtype(np.float32),
        numba_device(weight),
        numba_device(mean),
        numba_device(invstd),
        False,
        y=None if y is None else numba_device(y),
        dresidual=dresidual,
    )
    names = _launched(launches)
    assert "backward_eval_" + layout in names and not any(name.startswith("backward_elementwise") for name in names)
    grids = [grid for name, grid, _, _ in launches if name.startswith("backward_eval_")]
    assert grids[0][1] > 1, grids
    g = dy if y is None else np.where(y > 0, dy, 0).astype(np.float32)
    scale = (invstd.astype(np.float64) * weight).astype(np.float32).reshape(shape)
    np.testing.assert_array_equal(host(dx), g * scale)
    np.testing.assert_allclose(host(dbias), g.astype(np.float64).sum(axis=others), rtol=1e-5, atol=1e-5)
    dotp = ((x.astype(np.float64) - mean.reshape(shape)) * g).sum(axis=others)
    np.testing.assert_allclose(host(dweight), dotp * invstd, rtol=1e-4, atol=1e-4)
    if dresidual:
        np.testing.assert_array_equal(host(dres), g)
    else:
        assert dres is None
