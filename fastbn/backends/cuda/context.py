"""The caller's device, stream and allocator, for the length of one call.

A GPU call of fastbn runs where the caller's framework would run the same
work, and takes its memory where that framework would:

========================  ==========================================  ============================================
input                     stream of every launch                      memory for outputs and workspaces
========================  ==========================================  ============================================
PyTorch CUDA tensor       ``torch.cuda.current_stream(x.device)``     ``torch.empty`` (torch's caching allocator)
CuPy array                ``cupy.cuda.get_current_stream()``          ``cupy.empty`` (CuPy's memory pool)
Numba device array        the array's own ``stream`` (Numba's         fastbn's stream-ordered pool
                          default stream, unless it was made on one)  (:mod:`fastbn.backends.cuda.pool`)
other interface exporter  the interface's ``stream`` field (the       fastbn's stream-ordered pool
                          legacy default stream when it has none)
========================  ==========================================  ============================================

The input's device (``x.device`` for torch and CuPy; otherwise the device
that owns the pointer, asked of the driver) is made current for the call,
and every other GPU argument must be on the same device (a ``ValueError``
naming it otherwise, before any launch).  An argument whose interface names
another stream is waited for on the device (an event recorded on its stream,
waited on the launch stream), never on the host; nothing in a call
synchronises the device, so a call can be captured in a CUDA graph.

:func:`for_call` builds the :class:`CallContext` of a call from the caller's
arrays; :class:`Bound` runs a backend's operations inside it (the
dispatcher's :func:`fastbn._dispatch.prepare` hands it out); the kernels'
launches and allocations ask :func:`current`.  Under the simulator there is
one device and no stream to order, and memory is host memory.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn._frameworks import framework_of, is_device_array
from fastbn.backends.cuda import target
from fastbn.backends.cuda.pool import StreamOrderedPool

__all__ = ["Bound", "CallContext", "current", "device_array", "for_call", "launch_stream", "pool_of", "zeros"]

cuda = target.cuda
_local = threading.local()


class CallContext:
    """Where one call's launches and allocations go.

    Parameters
    ----------
    device : int or None
        The CUDA device ordinal to make current, or None to keep the
        current one (Numba's arrays in the current context; the simulator).
    stream : numba stream or None
        The stream of every launch; None is Numba's default stream.
    framework : str
        ``"torch"``, ``"cupy"`` or ``"numba"`` (Numba's arrays and every
        other exporter): whose allocator the call's memory comes from.
    """

    __slots__ = ("_entered", "device", "framework", "stream")

    def __init__(self, device: int | None = None, stream: Any = None, framework: str = "numba") -> None:
        self.device = device
        self.stream = stream
        self.framework = framework
        self._entered: list[Any] = []

    def __repr__(self) -> str:
        return f"CallContext(device={self.device}, stream={_handle(self.stream)}, framework={self.framework!r})"

    def __enter__(self) -> CallContext:
        switch = None
        # Asked of the driver, not with cuda.get_current_device(): on a thread with no current context that
        # would create device 0's (and leave it current) even for a call on another device.
        if self.device is not None and not target.SIMULATOR and target.current_device_ordinal() != self.device:
            switch = cuda.gpus[self.device]
            switch.__enter__()
        stack = _stack()
        stack.append(self)
        self._entered.append(switch)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack().pop()
        switch = self._entered.pop()
        if switch is not None:
            switch.__exit__(*exc)

    def launch_stream(self) -> Any:
        """The stream object kernels are launched on (Numba's default stream for None)."""
        return self.stream if self.stream is not None else cuda.default_stream()

    def allocate_bytes(self, nbytes: int) -> Any:
        """A new 1-D uint8 device array of ``nbytes`` bytes, from this call's allocator."""
        if target.SIMULATOR:
            return target.device_array(nbytes, np.uint8)
        if self.framework == "torch":
            torch = sys.modules["torch"]
            device = torch.device("cuda", self.device if self.device is not None else torch.cuda.current_device())
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            raw = cuda.from_cuda_array_interface(tensor.__cuda_array_interface__, owner=tensor, sync=False)
            raw._fastbn_tensor = tensor  # the restorer hands out views of this tensor itself (views.restorer)
            return raw
        if self.framework == "cupy":
            buffer = sys.modules["cupy"].empty(nbytes, dtype=np.uint8)
            return cuda.from_cuda_array_interface(buffer.__cuda_array_interface__, owner=buffer, sync=False)
        return _from_pool(nbytes, self.launch_stream())


def _stack() -> list[CallContext]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    assert isinstance(stack, list)
    return stack


_DEFAULT = CallContext()


def current() -> CallContext:
    """The innermost :class:`CallContext` entered on this thread, or the default one (Numba's defaults)."""
    stack = _stack()
    return stack[-1] if stack else _DEFAULT


def launch_stream() -> Any:
    """The stream the current call launches on."""
    return current().launch_stream()


def device_array(shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> Any:
    """An uninitialised C-contiguous device array, from the current call's allocator, on its device."""
    dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
    kind = np.dtype(dtype)
    raw = current().allocate_bytes(max(1, math.prod(dims) * kind.itemsize))
    return target.view(raw, dims, target.c_strides(dims, kind.itemsize), dtype=kind)


def zeros(shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> Any:
    """A device array of zeros, set on the launch stream (no host copy, so graph capture is safe)."""
    array = device_array(shape, dtype)
    nbytes = math.prod(array.shape) * np.dtype(dtype).itemsize
    if target.SIMULATOR:
        target.host_view(array)[...] = 0
    elif nbytes:
        target.memset(array, 0, nbytes, launch_stream())
    return array


# ------------------------------------------------------------ the pool ---
_pools: dict[int, StreamOrderedPool] = {}
_pools_lock = threading.Lock()


def pool_of(device: int) -> StreamOrderedPool:
    """fastbn's stream-ordered pool for device ordinal ``device`` (created on first use)."""
    with _pools_lock:
        pool = _pools.get(device)
        if pool is None:
            pool = _pools[device] = StreamOrderedPool(lambda nbytes: cuda.current_context().memalloc(nbytes))
        return pool


def _from_pool(nbytes: int, stream: Any) -> Any:
    device = current().device
    pool = pool_of(device if device is not None else cuda.get_current_device().id)
    block, size, release = pool.acquire(nbytes, _handle(stream))
    array = target.wrap_allocation(block, size)
    pool.release_when_collected(array, release)
    return array


# ------------------------------------------------- the caller's context ---
def _handle(stream: Any) -> int:
    """A stream's CUstream value as an int (0 for None, Numba's default, and the simulator's streams)."""
    if stream is None or isinstance(stream, int):
        return int(stream or 0)
    handle = getattr(stream, "handle", None)
    if handle is None:
        return 0
    try:
        return int(handle)  # cuda-python's CUstream
    except TypeError:
        return int(handle.value or 0)  # a ctypes handle


def _stream_of_handle(handle: int | None) -> Any:
    """A Numba stream object for a CUstream value from a framework or an interface's ``stream`` field."""
    if target.SIMULATOR:
        return None  # the simulator runs every launch synchronously: nothing to order
    if not handle:  # None, 0: no stream named
        return None
    if handle == 1:
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def _framework_stream(obj: Any, framework: str, device: int | None) -> Any:
    """The CUstream value of the framework's current stream for ``obj``, or the producer stream it names."""
    if framework == "torch":
        # torch's 0 is the legacy default stream; Numba's handle 0 is the per-thread one when Numba is set
        # to use per-thread default streams: name the legacy one (1) explicitly.
        return sys.modules["torch"].cuda.current_stream(obj.device).cuda_stream or 1
    if framework == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream().ptr
    if target.is_device_array(obj):
        return _handle(getattr(obj, "stream", 0))
    return _interface_stream(obj)


def _interface_stream(obj: Any) -> int | None:
    """The ``stream`` field of ``obj``'s interface as an int, None when absent or 0 (Numba exports 0 too)."""
    stream = obj.__cuda_array_interface__.get("stream")
    return int(stream) if stream else None


def _producer_stream(obj: Any, framework: str, first_framework: str) -> Any:
    """The stream an argument's producer names, if any: the interface's field, or a Numba array's stream.

    Arrays of the input's own framework (torch, CuPy) are ordered by that
    framework: all its work of the call is on its current stream.
    """
    if framework == first_framework and framework in ("torch", "cupy"):
        return None
    if target.is_device_array(obj):
        handle = _handle(getattr(obj, "stream", 0))
        return handle or None
    return _interface_stream(obj)


def _device_of(obj: Any, framework: str) -> int | None:
    """The CUDA device ordinal that holds ``obj``'s memory, or None (empty arrays; the simulator)."""
    if target.SIMULATOR:
        return None
    if framework == "torch":
        return int(obj.device.index)
    if framework == "cupy":
        return int(obj.device.id)
    pointer = (target.interface(obj) if target.is_device_array(obj) else obj.__cuda_array_interface__)["data"][0]
    return target.device_of_pointer(pointer) if pointer else None


def for_call(arrays: Sequence[tuple[str, Any]]) -> CallContext:
    """The :class:`CallContext` of a call on the caller's GPU ``arrays``, the input first.

    Parameters
    ----------
    arrays : sequence of (str, object)
        The call's array arguments by name, as the caller gave them (None
        for those not given).

    Raises
    ------
    ValueError
        If a GPU argument is on another device than the input (the message
        names it and both devices).  Raised before anything is launched.
    """
    first_name, first = arrays[0]
    framework = framework_of(first)
    if framework not in ("torch", "cupy"):
        framework = "numba"
    device = _device_of(first, framework)
    for name, obj in arrays[1:]:
        if not is_device_array(obj):
            continue
        other = _device_of(obj, framework_of(obj))
        if device is not None and other is not None and other != device:
            raise ValueError(
                f"{name}: is on cuda:{other} but {first_name} is on cuda:{device}; pass every argument on one device"
            )
    if target.SIMULATOR:
        return CallContext(device, None, framework)
    context = CallContext(device, None, framework)
    with context:  # the stream objects belong to the device's context
        context.stream = _stream_of_handle(_framework_stream(first, framework, device))
        launch = _handle(context.stream)
        first_framework = framework_of(first)
        for _, obj in arrays:
            if obj is None:
                continue
            producer = _producer_stream(obj, framework_of(obj), first_framework)
            if producer is not None and producer != launch and {producer, launch} != {0, 1}:
                event = _event()
                event.record(stream=_stream_of_handle(producer))
                event.wait(stream=context.launch_stream())
    return context


def _event() -> Any:
    """This thread's event for the current device, made once and re-recorded by each call.

    A new event per call would be destroyed later through Numba's deferred
    deallocations, whose flush also frees pending device memory: a device
    synchronisation inside a call.
    """
    events = getattr(_local, "events", None)
    if events is None:
        events = _local.events = {}
    device = cuda.get_current_device().id
    event = events.get(device)
    if event is None:
        event = events[device] = cuda.event(timing=False)
    return event


class Bound:
    """A backend whose every operation runs inside one call's :class:`CallContext`.

    :func:`fastbn._dispatch.prepare` returns this in place of the CUDA
    backend, so that the array conversions, the launches and the
    allocations of the operation the caller then runs all happen on the
    caller's device and stream, with its allocator.
    """

    def __init__(self, backend: Any, context: CallContext) -> None:
        self._backend = backend
        self._context = context

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._backend, name)
        if not callable(attribute):
            return attribute
        context = self._context

        def in_context(*args: Any, **kwargs: Any) -> Any:
            with context:
                return attribute(*args, **kwargs)

        in_context.__name__ = name
        return in_context

    def __repr__(self) -> str:
        return f"Bound({self._backend!r}, {self._context!r})"
