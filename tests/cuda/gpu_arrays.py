"""GPU arrays for the CUDA tests (Numba's own device arrays), and small strategies for its tests.

:func:`gpu` copies a host array into one of Numba's device arrays with the
host array's strides: the simulator's ``FakeCUDAArray`` under
``NUMBA_ENABLE_CUDASIM=1``, a real ``DeviceNDArray`` on a GPU.  The tests
therefore take the path a user's own ``cuda.to_device`` arrays take, in the
simulator as on hardware.  :class:`ForeignGPUArray` stands for the other
producers (CuPy, PyTorch): any object that only exposes
``__cuda_array_interface__``; it exists in the simulator only, where device
memory is host memory.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from fastbn.backends.cuda import target

from strategies import cases, forward_inputs

cuda = target.cuda


class ForeignGPUArray:
    """Simulator only: a foreign GPU array (as CuPy or torch would give) over ``array``'s memory."""

    def __init__(self, array):
        assert target.SIMULATOR, "host memory is device memory only in the simulator"
        self.array = array

    @property
    def __cuda_array_interface__(self):
        array = self.array
        return {
            "shape": array.shape,
            "strides": array.strides,
            "typestr": array.dtype.str,
            "data": (array.ctypes.data, not array.flags.writeable),
            "version": 3,
        }

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype


def gpu(array):
    """A copy of ``array`` in one of Numba's device arrays, with ``array``'s strides (None stays None).

    C-contiguous arrays go through ``cuda.to_device``; any other strides
    (channels-last, permuted, sliced with gaps, negative) copy the span of
    memory the array covers and view it with the same strides, so the
    kernels see the layout the host array has.
    """
    if array is None:
        return None
    array = np.asarray(array)
    if array.flags.c_contiguous or array.size == 0:
        return cuda.to_device(np.ascontiguousarray(array))
    itemsize = array.dtype.itemsize
    low = sum(min(0, s * (n - 1)) for n, s in zip(array.shape, array.strides))
    high = sum(max(0, s * (n - 1)) for n, s in zip(array.shape, array.strides)) + itemsize
    start = array.__array_interface__["data"][0] + low
    span = np.ctypeslib.as_array((ctypes.c_uint8 * (high - low)).from_address(start)).copy()
    device_span = cuda.to_device(span)
    if target.SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        view = np.ndarray(array.shape, array.dtype, buffer=device_span._ary, offset=-low, strides=array.strides)
        return FakeCUDAArray(view)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(array.shape, array.strides, array.dtype, gpu_data=device_span.gpu_data.view(-low))


def forbid_transfers(monkeypatch):
    """Make every host <-> device copy that fastbn's code makes fail; the tests' own copies still work.

    A copy fails when any frame of the stack that makes it belongs to
    fastbn, so :func:`gpu` and :func:`host` keep working while fastbn is
    held to making none.
    """
    if target.SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as array_class
    else:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray as array_class

    def guarded(original):
        def copy(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module == "fastbn" or module.startswith("fastbn."):
                    raise AssertionError(f"a host <-> device copy inside fastbn ({module})")
                frame = frame.f_back
            return original(*args, **kwargs)

        return copy

    for name in ("copy_to_host", "copy_to_device"):
        monkeypatch.setattr(array_class, name, guarded(getattr(array_class, name)))
    monkeypatch.setattr(target.cuda, "to_device", guarded(target.cuda.to_device))


def readonly_gpu(array):
    """A GPU array whose interface says it is read-only, over a device copy of ``array``."""
    if target.SIMULATOR:
        return ForeignGPUArray(_readonly(array.copy()))
    device = gpu(array)

    class ReadOnly:
        def __init__(self):
            desc = dict(device.__cuda_array_interface__)
            desc["data"] = (desc["data"][0], True)
            self.__cuda_array_interface__ = desc
            self.shape, self.dtype, self.device = device.shape, device.dtype, device

    return ReadOnly()


def _readonly(array):
    array.flags.writeable = False
    return array


def numba_device(array):
    """A copy of ``array`` in a numba (simulator) device array."""
    device = target.device_array(array.shape, array.dtype)
    device.copy_to_device(np.ascontiguousarray(array))
    return device


def host(device):
    """A result device array's values, on the host."""
    assert target.is_device_array(device), type(device)
    return device.copy_to_host()


# Small cases: the simulator spends about a millisecond per simulated thread.
SMALL = dict(max_elems=96, max_rank=4, allow_large=False, max_channels=5)


def small_cases(**kw):
    """strategies.cases restricted to simulator-sized inputs."""
    return cases(**{**SMALL, **kw})


def small_forward_inputs(**kw):
    """strategies.forward_inputs restricted to simulator-sized inputs."""
    return forward_inputs(**{**SMALL, **kw})
