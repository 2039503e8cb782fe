"""Framework tensors in, the same kind out: fastbn's public functions with torch and JAX arrays.

Each framework's expected values are fastbn's own NumPy results on the same data (the kernels
are shared, so the comparison is exact); what is tested here is the conversion: the kind that
comes back, zero-copy views, in-place running statistics, errors, and that recognising a
framework never imports one.  The torch and JAX parts skip only when the framework is missing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
from fastbn import _frameworks
from fastbn.backends.cpu import views


def data_pointer(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def batch(seed=0, shape=(6, 3, 4, 5), dtype=np.float32):
    return np.random.default_rng(seed).normal(2.0, 3.0, shape).astype(dtype)


def numpy_reference(x, dy, axis=1):
    """forward, backward, moments and normalize on NumPy copies: the values every framework must reproduce."""
    channels = x.shape[axis]
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis)
    dx, dweight, dbias = fastbn.backward(dy, x, None, saved, axis=axis)
    mean, var = fastbn.moments(x, axis=axis)
    return dict(
        y=y,
        dx=dx,
        dweight=dweight,
        dbias=dbias,
        mean=mean,
        var=var,
        normalized=fastbn.normalize(x, mean, var, axis=axis),
        running_mean=rm,
        running_var=rv,
    )


def run_calls(x, dy, rm, rv, axis=1):
    """The same four calls with the caller's arrays."""
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, axis=axis)
    dx, dweight, dbias = fastbn.backward(dy, x, None, saved, axis=axis)
    mean, var = fastbn.moments(x, axis=axis)
    return dict(
        y=y,
        dx=dx,
        dweight=dweight,
        dbias=dbias,
        mean=mean,
        var=var,
        normalized=fastbn.normalize(x, mean, var, axis=axis),
    )


# ------------------------------------------------------- no framework imported ---
FRAMEWORK_CALLS = {
    "numpy": "import numpy as np\nmake = np.asarray",
    "torch": "import torch\nmake = torch.from_numpy",
    "jax": "import jax.numpy as jnp\nmake = jnp.asarray",
}


@pytest.mark.parametrize("caller", list(FRAMEWORK_CALLS))
def test_calls_import_no_framework_the_caller_did_not(caller):
    if caller != "numpy":
        pytest.importorskip(caller)
    script = (
        FRAMEWORK_CALLS[caller]
        + "\n"
        + textwrap.dedent(
            """
        import sys
        import numpy as np
        import fastbn
        x = make(np.random.default_rng(0).normal(size=(8, 3, 2)).astype(np.float32))
        y, saved = fastbn.forward(x, make(np.ones(3, np.float32)), make(np.zeros(3, np.float32)))
        fastbn.backward(y, x, None, saved)
        mean, var = fastbn.moments(x)
        fastbn.normalize(x, mean, var)
        assert type(y).__module__.split(".")[0] in {"numpy": ("numpy",), "torch": ("torch",),
                                                   "jax": ("jax", "jaxlib")}[CALLER], type(y)
        print(sorted(m for m in ("torch", "jax", "jaxlib", "cupy", "tensorflow") if m in sys.modules))
        """
        ).replace("CALLER", repr(caller))
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected = {"numpy": [], "torch": ["torch"], "jax": ["jax", "jaxlib"]}[caller]
    assert proc.stdout.strip() == str(expected)


# ----------------------------------------------------------- generic objects ---
class ArrayLike:
    """Has only __array__ (like many containers): read through np.asarray."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


class DLPackOnly:
    """Has only the DLPack protocol, as a framework without __array__ would."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_numpy_in_numpy_out_and_running_stats_in_place():
    x, dy = batch(1), batch(2)
    expected = numpy_reference(x, dy)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    got = run_calls(x, dy, rm, rv)
    for key, value in got.items():
        assert type(value) is np.ndarray, key
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    np.testing.assert_array_equal(rm, expected["running_mean"])
    np.testing.assert_array_equal(rv, expected["running_var"])


def test_array_and_dlpack_objects_give_numpy():
    x = batch(3)
    expected, _ = fastbn.forward(x)
    for wrapped in (ArrayLike(x), DLPackOnly(x), x.tolist()):
        y, _ = fastbn.forward(wrapped)
        assert type(y) is np.ndarray
        np.testing.assert_allclose(y, expected, rtol=0, atol=0 if not isinstance(wrapped, list) else 1e-6)
    # DLPack gives a view, not a copy.
    assert data_pointer(views.to_host(DLPackOnly(x), "x")) == data_pointer(x)


def test_unreadable_arguments_name_themselves():
    with pytest.raises(TypeError, match=r"^x: "):
        fastbn.forward("not an array")
    with pytest.raises(TypeError, match=r"^weight: "):
        fastbn.forward(batch(), {"a": 1})


def test_framework_of_is_cached_per_type():
    assert _frameworks.framework_of(np.zeros(2)) == "numpy"
    assert _frameworks.framework_of([1.0]) == "other"
    assert _frameworks._KIND_BY_TYPE[list] == "other"


# --------------------------------------------------------------------- torch ---
def test_torch_in_torch_out_same_values():
    torch = pytest.importorskip("torch")
    x, dy = batch(4), batch(5)
    expected = numpy_reference(x, dy)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_pointer = rm.data_ptr()
    got = run_calls(torch.from_numpy(x), torch.from_numpy(dy), rm, rv)
    for key, value in got.items():
        assert type(value) is torch.Tensor, key
        assert not value.requires_grad
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
    # Running statistics: the caller's tensors, updated in place.
    assert rm.data_ptr() == rm_pointer
    np.testing.assert_array_equal(rm.numpy(), expected["running_mean"])
    np.testing.assert_array_equal(rv.numpy(), expected["running_var"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced", "requires_grad"])
def test_torch_tensors_are_viewed_not_copied(layout):
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(batch(6, shape=(4, 3, 6, 5)))
    tensor = {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base.transpose(2, 3),
        "sliced": base[:, :, ::2],
        "requires_grad": base.clone().requires_grad_(),
    }[layout]
    view = views.to_host(tensor, "x")
    assert data_pointer(view) == tensor.data_ptr()
    assert view.strides == tuple(s * tensor.element_size() for s in tensor.stride())
    np.testing.assert_array_equal(view, tensor.detach().numpy())
    # And back: results become tensors over the same memory.  (A tensor that
    # requires grad is refused outside no_grad: tests/test_torch_dropin.py.)
    with torch.no_grad():
        y, _ = fastbn.forward(tensor)
    expected, _ = fastbn.forward(tensor.detach().numpy().copy())
    np.testing.assert_array_equal(y.numpy(), expected)
    result = np.ones((2, 3), np.float32)
    assert views.restorer(tensor)(result).data_ptr() == data_pointer(result)


def test_torch_channels_last_gives_channels_last():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(batch(7)).to(memory_format=torch.channels_last)
    dy = torch.from_numpy(batch(8)).to(memory_format=torch.channels_last)
    y, saved = fastbn.forward(x)
    dx, _, _ = fastbn.backward(dy, x, None, saved)
    for tensor in (y, dx):
        assert tensor.is_contiguous(memory_format=torch.channels_last)
        assert not tensor.is_contiguous()


def test_torch_mixed_with_numpy():
    torch = pytest.importorskip("torch")
    x = batch(9)
    expected = numpy_reference(x, x)
    # torch input, NumPy running statistics (updated in place), NumPy-kind check of y.
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, _ = fastbn.forward(torch.from_numpy(x), running_mean=rm, running_var=rv)
    assert type(y) is torch.Tensor
    np.testing.assert_array_equal(rm, expected["running_mean"])
    # NumPy input, torch running statistics: NumPy out, the tensors updated.
    trm, trv = torch.zeros(3), torch.ones(3)
    y, _ = fastbn.forward(x, running_mean=trm, running_var=trv)
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(trv.numpy(), expected["running_var"])


def test_torch_half_input_keeps_float_statistics():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(batch(10, dtype=np.float16))
    y, _saved = fastbn.forward(x, torch.ones(3), torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3))
    assert y.dtype == torch.float16
    mean, var = fastbn.moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


def test_torch_bfloat16_input_is_a_view_and_keeps_float_statistics():
    """A bfloat16 tensor (which Tensor.numpy() refuses) comes in as a view of ml_dtypes' bfloat16 and
    its results go back as bfloat16 tensors: the same values as the NumPy bfloat16 call."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    x = torch.from_numpy(batch(10)).to(torch.bfloat16, memory_format=torch.channels_last)
    host = views.to_host(x, "x")
    assert host.dtype == ml_dtypes.bfloat16 and data_pointer(host) == x.data_ptr()
    expected = numpy_reference(host, host)
    rm, rv = torch.zeros(3), torch.ones(3)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(y.view(torch.int16).numpy(), expected["y"].view(np.int16))
    np.testing.assert_array_equal(rv.numpy(), expected["running_var"])
    dx, dweight, _ = fastbn.backward(x, x, None, saved)
    assert dx.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    np.testing.assert_array_equal(dx.view(torch.int16).numpy(), expected["dx"].view(np.int16))


def test_torch_unsupported_tensors_are_clear_errors():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(batch(11))
    with pytest.raises(TypeError, match=r"^running_mean: expected dtype float32 \(to match the input\), got bfloat16"):
        fastbn.forward(x, running_mean=torch.zeros(3, dtype=torch.bfloat16), running_var=torch.ones(3))
    with pytest.raises(ValueError, match=r"^x: is a torch tensor on device 'meta'"):
        fastbn.forward(torch.empty(4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"^running_var: must not be an expanded"):
        fastbn.forward(x, running_mean=torch.zeros(3), running_var=torch.ones(1).expand(3))
    rm, rv = torch.zeros(3).to_sparse(), torch.ones(3)
    for kwargs, name in ((dict(running_mean=rm, running_var=rv), "running_mean"), (dict(weight=rm), "weight")):
        with pytest.raises(TypeError, match=rf"^{name}: a torch tensor of layout torch.sparse_coo; fastbn takes dense"):
            fastbn.forward(x, **kwargs)
    assert rv.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match=r"^x: expected dtype float16, bfloat16, float32 or float64, got int64"):
        fastbn.forward(torch.ones(4, 3, dtype=torch.int64))


def test_torch_error_leaves_running_stats_untouched():
    torch = pytest.importorskip("torch")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"^weight: "):
        fastbn.forward(torch.from_numpy(batch(12)), torch.ones(3, dtype=torch.float64), running_mean=rm, running_var=rv)
    assert rm.eq(0).all() and rv.eq(1).all()


# ----------------------------------------------------------------------- jax ---
def test_jax_in_jax_out_same_values():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x, dy = batch(13), batch(14)
    expected = numpy_reference(x, dy)
    # Running statistics must be writable; NumPy ones are, next to JAX data.
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    got = run_calls(jnp.asarray(x), jnp.asarray(dy), rm, rv)
    for key, value in got.items():
        assert isinstance(value, jax.Array), key
        np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg=key)
    np.testing.assert_array_equal(rm, expected["running_mean"])


def test_jax_arrays_are_read_only_views():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    x = jnp.asarray(batch(15))
    view = views.to_host(x, "x")
    assert data_pointer(view) == x.unsafe_buffer_pointer()
    assert not view.flags.writeable


def test_jax_results_stay_on_a_committed_device():
    jax = pytest.importorskip("jax")

    device = jax.devices("cpu")[0]
    x = jax.device_put(batch(16), device)
    assert x.committed
    y, _ = fastbn.forward(x)
    assert y.committed and y.devices() == {device}


def test_jax_running_stats_and_tracers_are_clear_errors():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = jnp.asarray(batch(17))
    with pytest.raises(ValueError, match=r"^running_mean: is a JAX array, which is immutable.*fastbn.jax"):
        fastbn.forward(x, running_mean=jnp.zeros(3), running_var=jnp.ones(3))
    with pytest.raises(TypeError, match=r"^x: is a traced JAX value.*fastbn.jax.batch_norm"):
        jax.jit(lambda a: fastbn.forward(a)[0])(x)
