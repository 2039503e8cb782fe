"""Stand-ins for GPU arrays under the CUDA simulator, and small strategies for its tests.

In the simulator, device memory is host memory.  :class:`SimGPUArray` exposes
a NumPy array through ``__cuda_array_interface__`` with the array's own
strides, exactly as a CuPy array or a PyTorch CUDA tensor exposes device
memory, so the tests go through the same dispatcher path (detection, zero-copy
conversion, layout choice) as those would on a GPU.
"""

from __future__ import annotations

import numpy as np

from fastbn.backends.cuda import target

from strategies import cases, forward_inputs


class SimGPUArray:
    """A foreign GPU array (as CuPy or torch would give) over ``array``'s memory."""

    def __init__(self, array):
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
    """``array`` as a foreign GPU array sharing its memory (None stays None)."""
    return None if array is None else SimGPUArray(array)


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
