"""The one module that imports the CUDA target, and the only one that knows which it is.

fastbn's GPU kernels (:mod:`fastbn.backends.cuda.numerics`,
:mod:`~fastbn.backends.cuda.reductions` and
:mod:`~fastbn.backends.cuda.elementwise`) run on a CUDA target for Numba:

* **numba-cuda** (``from numba import cuda``): the one in use.  It has been in
  maintenance mode since 2026-06.
* **numba-cuda-mlir** (``from numba_cuda_mlir import cuda``): its announced
  successor, "intended to be compatible with Numba-CUDA kernels"; its
  migration guide says that changing the import is enough for code that uses
  no extension API.

The kernels keep to the kernel API that both document: ``cuda.jit``,
``threadIdx``/``blockIdx``/``blockDim``/``gridDim``, ``cuda.shared.array``
with a constant shape, ``cuda.syncthreads``, ``cuda.shfl_down_sync``,
``cuda.device_array``, ``cuda.as_cuda_array`` (the CUDA Array Interface),
``cuda.compile_ptx`` and ``cuda.is_available``; and to NumPy scalar
constructors (``np.float32(v)``) as casts.  They use no extension API
(``@intrinsic``, ``@overload``, ``@lower``), which is where the two targets
differ (LLVM IR against MLIR).  Everything else a backend needs from the
target goes through the functions below, so moving to numba-cuda-mlir means
changing this module only.

``FASTBN_CUDA_TARGET=numba-cuda-mlir`` (read once, when this module is first
imported) takes numba-cuda-mlir instead (``pip install 'fastbn[mlir]'``).
With numba-cuda-mlir 0.6 every kernel of :func:`fastbn.backends.cuda.plan.signatures`
compiles to PTX for every dtype (``FASTBN_CUDA_TARGET=numba-cuda-mlir python -m
fastbn ptx``; tests/test_cuda_mlir.py); it has not run on a GPU.  Its driver-level
modules (``cudadrv``, ``core.caching``, ``cuda_paths``) are a vendored copy of
numba-cuda's, taken through :func:`_submodule`.  Three details stay
numba-cuda's: device functions inlined with ``inline="always"`` (accepted by
both); the libdevice lookup that :func:`_pair_libdevice_with_nvvm` corrects
(numba-cuda only); and the simulator, which numba-cuda-mlir does not have.

This module also supplies what Numba's CUDA *simulator*
(``NUMBA_ENABLE_CUDASIM=1``, which runs the GPU tests on machines without a
GPU) lacks: warp shuffles, the CUDA Array Interface on its device arrays, and
``as_cuda_array``.

Importing this module raises ImportError when no CUDA target is installed;
:func:`fastbn.backends.load` turns that into a clear error for GPU calls, and
CPU use never imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn._frameworks import missing_dependency
from fastbn._layout import c_strides  # re-exported: the CUDA modules take it from here
from fastbn.backends import sources_hash

#: Environment variable choosing the CUDA target: ``numba-cuda`` (the default) or ``numba-cuda-mlir``.
TARGET_VARIABLE = "FASTBN_CUDA_TARGET"
_TARGETS = ("numba-cuda", "numba-cuda-mlir")
_CHOSEN = os.environ.get(TARGET_VARIABLE, "numba-cuda") or "numba-cuda"
if _CHOSEN not in _TARGETS:
    raise ValueError(f"{TARGET_VARIABLE}: expected one of {', '.join(_TARGETS)}, got {_CHOSEN!r}")
MLIR = _CHOSEN == "numba-cuda-mlir"

if MLIR:
    try:
        from numba_cuda_mlir import cuda
    except ImportError as exc:
        raise missing_dependency("fastbn's CUDA backend on numba-cuda-mlir", "numba-cuda-mlir", "mlir", exc) from exc

    types = cuda.types
    #: The package of the target's driver-level modules (cudadrv, core.caching, cuda_paths).
    _PACKAGE = "numba_cuda_mlir.numba_cuda"
else:
    # Without numba-cuda, ``from numba import cuda`` still finds the deprecated
    # CUDA target that Numba itself ships, on which the kernels do not compile:
    # ask for numba-cuda by name.
    if importlib.util.find_spec("numba_cuda") is None:
        raise missing_dependency("fastbn's CUDA backend", "numba-cuda", "cuda")
    try:
        from numba import cuda  # the CUDA target; see the module docstring before changing it
        from numba.cuda import types  # type: ignore[no-redef]  # numba-cuda-mlir's branch above defines it too
    except ImportError as exc:
        raise missing_dependency(
            "fastbn's CUDA backend", f"numba-cuda, which did not import ({exc})", "cuda", exc
        ) from exc
    _PACKAGE = "numba.cuda"


def _submodule(name: str) -> ModuleType:
    """The target's module ``name`` (e.g. ``"cudadrv.driver"``), numba-cuda's or numba-cuda-mlir's copy."""
    return importlib.import_module(f"{_PACKAGE}.{name}")


__all__ = [
    "MLIR",
    "NAME",
    "SIMULATOR",
    "TARGET_VARIABLE",
    "as_device_array",
    "c_strides",
    "compile_ptx",
    "compiler_paths",
    "cuda",
    "current_device_ordinal",
    "device_array",
    "device_function",
    "device_of_pointer",
    "host_view",
    "interface",
    "is_available",
    "is_device_array",
    "kernel",
    "memset",
    "named_kernel",
    "shfl_down",
    "supported_ccs",
    "toolkit_version",
    "types",
    "view",
    "wrap_allocation",
]

#: True when Numba's CUDA simulator stands in for a GPU (kernels run as Python threads).
#: numba-cuda reads NUMBA_ENABLE_CUDASIM once, when it is first imported.
SIMULATOR = bool(getattr(cuda.config, "ENABLE_CUDASIM", False))

#: Which CUDA target fastbn's kernels run on.
NAME = "numba-cuda-mlir" if MLIR else "numba-cuda (simulator)" if SIMULATOR else "numba-cuda"


def is_available() -> bool:
    """True if kernels can run: a usable GPU and driver, or the simulator."""
    return SIMULATOR or bool(cuda.is_available())


# The one-thread-per-channel kernels launch a few blocks by design (C threads): numba-cuda warns at every
# new grid size under 128 blocks that the GPU is under-used, which says nothing about them.
warnings.filterwarnings("ignore", message=r"Grid size .* will likely result in GPU under-utilization")


def kernel(func: Callable[..., Any]) -> Any:
    """Make ``func`` a CUDA kernel, compiled lazily for each argument-type signature, cached on disk.

    The cache is numba-cuda's (``cuda.jit(cache=True)``: next to the
    sources or under ``NUMBA_CACHE_DIR``, as the CPU kernels'), keyed on the
    sources of the whole CUDA backend (:func:`_stamp_with_backend_sources`);
    a cache that fails never fails a call (:class:`_GuardedCache`).  Each
    compilation is logged (:func:`_log_compilations`).
    """
    if SIMULATOR:  # the simulator runs the Python function: nothing is compiled or cached
        return cuda.jit(func)
    try:
        dispatcher = cuda.jit(func, cache=True)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available" (no writable directory)
        dispatcher = cuda.jit(func)
        dispatcher._fastbn_uncached = f"not cached on disk ({exc})"
    else:
        _stamp_with_backend_sources(dispatcher)
        dispatcher._cache = _GuardedCache(dispatcher, dispatcher._cache)
    _log_compilations(dispatcher)
    return dispatcher


def _backend_sources_hash() -> bytes:
    """SHA-256 of every source file of the CUDA backend, in name order (read once per process)."""
    return sources_hash(os.path.dirname(os.path.abspath(__file__)))


def _stamp_with_backend_sources(dispatcher: Any) -> None:
    """Key a kernel's disk cache on all of the backend's sources, not only its own file.

    Numba drops a cached kernel when the kernel's own source file changes,
    but not when a device function it inlines from another file
    (``numerics.py`` into ``reductions.py``) does; the stale kernel would
    then run old code.  The stamp is private to Numba's cache, so another
    numba-cuda keeps its own (per-file) rule.
    """
    cache_file = getattr(dispatcher._cache, "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = _backend_sources_hash()


class _GuardedCache:
    """A CUDA kernel's disk cache whose failures never fail a call.

    A cache file that cannot be read (truncated, corrupt, from another
    toolkit) counts as a miss, and its index is rewritten empty so the next
    save heals it; a save that fails (a directory made read-only, a full
    disk) turns caching off for that kernel in this process.  Both are
    logged on ``fastbn.compile`` with the reason.
    """

    def __init__(self, dispatcher: Any, cache: Any) -> None:
        self._dispatcher = dispatcher
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return self._cache.load_overload(sig, target_context)
        except MemoryError:
            raise
        except Exception as exc:
            _log.warning("CUDA kernel cache unreadable (%s: %s); compiling instead", type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                self._cache.flush()
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            self._cache.save_overload(sig, data)
        except MemoryError:
            raise
        except Exception as exc:
            _log.warning(
                "CUDA kernel cache not writable (%s: %s); caching is off for this kernel", type(exc).__name__, exc
            )
            self._dispatcher._cache = _submodule("core.caching").NullCache()
            self._dispatcher._fastbn_uncached = f"the cache failed ({type(exc).__name__}: {exc})"


_log = logging.getLogger("fastbn.compile")


_FIRST_USE = "first use in this process (loaded from the disk cache if there)"


def _log_compilations(dispatcher: Any) -> None:
    """Announce each compilation of ``dispatcher`` on the ``fastbn.compile`` logger, as the CPU kernels do.

    The INFO lines name the kernel, the argument types and the reason (not
    in the disk cache, or why there is no cache), then the time taken; each
    record carries ``fastbn_event`` (``"compile"``, ``"compiled"``),
    ``fastbn_kernel`` and ``fastbn_signature``.  Wraps the dispatcher's
    ``compile``, which Numba calls only for a signature it has not compiled
    in this process; a kernel loaded from the disk cache logs ``compiled``
    in far less time.
    """
    compile_ = dispatcher.compile

    def compile(sig: Any) -> Any:
        overloads = getattr(dispatcher, "overloads", {})
        if not (isinstance(sig, tuple) and sig not in overloads and _log.isEnabledFor(logging.INFO)):
            return compile_(sig)
        name = f"cuda.{dispatcher.py_func.__name__}"
        extra = {"fastbn_kernel": name, "fastbn_signature": str(sig), "fastbn_cache": None}
        arrays = [t for t in sig if isinstance(t, types.Array)]
        words = f"{arrays[0].dtype}, {arrays[0].ndim}-D" if arrays else ", ".join(str(t) for t in sig)
        reason = getattr(dispatcher, "_fastbn_uncached", None) or _FIRST_USE
        _log.info(
            "compiling CUDA kernel %s (%s): %s",
            name,
            words,
            reason,
            extra=dict(extra, fastbn_event="compile", fastbn_reason=reason),
        )
        start = time.perf_counter()
        result = compile_(sig)
        seconds = time.perf_counter() - start
        _log.info(
            "compiled CUDA kernel %s (%s) in %.2f s",
            name,
            words,
            seconds,
            extra=dict(extra, fastbn_event="compiled", fastbn_seconds=seconds),
        )
        return result

    dispatcher.compile = compile


def named_kernel(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: :func:`kernel`, under the Python name ``name`` (its name in launches and PTX).

    The kernel generators compile one variant of a kernel per option set;
    naming each variant for its options lets ``python -m fastbn ptx`` and the
    launch log tell them apart.
    """

    def decorate(func: Callable[..., Any]) -> Any:
        func.__name__ = func.__qualname__ = name
        return kernel(func)

    return decorate


def device_function(func: Callable[..., Any]) -> Any:
    """Make ``func`` callable from kernels.

    ``inline="always"`` inlines it into the caller at Numba IR level, before
    typing.  Besides saving a call, that is what lets ``python -m fastbn ptx``
    compile kernels with no GPU present: numba-cuda compiles a separately
    called device function for the compute capability of the current device.
    """
    return cuda.jit(device=True, inline="always")(func)


def device_array(shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> Any:
    """Allocate an uninitialised device array."""
    if SIMULATOR:
        return _SimDeviceArray(np.empty(shape, dtype))
    return cuda.device_array(shape, dtype)


# ------------------------------------------------------------ warp shuffle ---
_FULL_MASK = 0xFFFFFFFF

if not SIMULATOR:

    @device_function
    def shfl_down(value: Any, delta: Any) -> Any:
        """The ``value`` of lane ``laneid + delta`` of this warp (all 32 lanes take part)."""
        return cuda.shfl_down_sync(_FULL_MASK, value, delta)

else:
    # The simulator runs each CUDA thread as a Python thread but has no warp
    # shuffles.  This emulation gives shfl_down_sync's semantics to kernels
    # that shuffle in lockstep (every lane of a warp makes the same sequence of
    # calls): a thread posts its value for its k-th call, then waits for the
    # source lane's k-th value.  A source outside the warp or block returns the
    # caller's own value, as on hardware.
    _boards: weakref.WeakKeyDictionary[Any, tuple[threading.Condition, dict[tuple[int, int], Any]]] = (
        weakref.WeakKeyDictionary()
    )
    _boards_lock = threading.Lock()

    def shfl_down(value: Any, delta: Any) -> Any:
        """Simulator emulation of ``cuda.shfl_down_sync(0xFFFFFFFF, value, delta)``."""
        thread: Any = threading.current_thread()  # a simulator thread, with its block and lane
        manager = thread._manager  # the simulator's BlockManager for this block
        with _boards_lock:
            board = _boards.get(manager)
            if board is None:
                board = _boards[manager] = (threading.Condition(), {})
        condition, posted = board
        call = getattr(thread, "_fastbn_shuffles", 0)
        thread._fastbn_shuffles = call + 1
        lane_id = thread.thread_id
        source = lane_id + int(delta)
        with condition:
            posted[call, lane_id] = value
            condition.notify_all()
            if lane_id % 32 + int(delta) >= 32 or source >= math.prod(manager._block_dim):
                return value
            while (call, source) not in posted:
                if thread.abort:
                    raise RuntimeError("simulated kernel aborted during a warp shuffle")
                condition.wait(timeout=0.5)
            return posted[call, source]


# ------------------------------------------------ CUDA Array Interface I/O ---
if not SIMULATOR:
    _DeviceNDArray = _submodule("cudadrv.devicearray").DeviceNDArray
else:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray

    class _SimDeviceArray(_FakeCUDAArray):  # type: ignore[misc]  # the simulator's classes are not followed: Any
        """A simulator device array that exports ``__cuda_array_interface__``.

        Simulated device memory is host memory, so the exported pointer is the
        NumPy buffer's address; this lets the simulator tests pass "GPU arrays"
        through fastbn's dispatcher exactly as numba-cuda's device arrays go.
        """

        @property
        def __cuda_array_interface__(self) -> dict[str, Any]:
            data = self._ary
            return {
                "shape": tuple(data.shape),
                "strides": None if data.flags.c_contiguous else tuple(data.strides),
                "typestr": data.dtype.str,
                "data": (data.ctypes.data if data.size else 0, not data.flags.writeable),
                "version": 3,
                "stream": None,
            }

        def __getitem__(self, index: Any) -> Any:
            result = super().__getitem__(index)
            return _SimDeviceArray(result._ary) if isinstance(result, _FakeCUDAArray) else result

    def _sim_from_interface(desc: Mapping[str, Any], owner: object) -> _SimDeviceArray:
        dtype = np.dtype(desc["typestr"])
        shape = tuple(desc["shape"])
        strides = desc.get("strides")
        if strides is None:
            strides = c_strides(shape, dtype.itemsize)
        pointer, readonly = desc["data"]
        if math.prod(shape) == 0:
            array = np.empty(shape, dtype)
        else:
            low = sum(min(0, s * (n - 1)) for n, s in zip(shape, strides))
            high = sum(max(0, s * (n - 1)) for n, s in zip(shape, strides)) + dtype.itemsize
            buffer = (ctypes.c_char * (high - low)).from_address(pointer + low)
            # The memory's owner lives as long as the buffer, which every
            # NumPy view of this array (slices included) keeps alive.
            buffer._fastbn_owner = owner
            array = np.ndarray(shape, dtype, buffer=buffer, offset=-low, strides=strides)
            array.flags.writeable = not readonly
        result = _SimDeviceArray(array)
        result.__dict__["_owner"] = owner  # keeps the memory's owner alive
        return result


class _Interface:
    """Carries a hand-made ``__cuda_array_interface__`` and keeps its owner alive."""

    def __init__(self, desc: dict[str, Any], owner: object) -> None:
        self.__cuda_array_interface__ = desc
        self._owner = owner


def is_device_array(obj: object) -> bool:
    """True for this target's own device arrays."""
    return isinstance(obj, _FakeCUDAArray if SIMULATOR else _DeviceNDArray)


def as_device_array(obj: Any) -> Any:
    """Zero-copy device array over any object exposing ``__cuda_array_interface__``.

    Never synchronises: the call's launches are ordered after the producer's
    stream on the device (:func:`fastbn.backends.cuda.context.for_call`).
    """
    if is_device_array(obj):
        return _SimDeviceArray(obj._ary) if SIMULATOR and not isinstance(obj, _SimDeviceArray) else obj
    desc = obj.__cuda_array_interface__
    if SIMULATOR:
        return _sim_from_interface(desc, obj)
    return cuda.from_cuda_array_interface(desc, owner=obj, sync=False)


def interface(array: Any) -> dict[str, Any]:
    """The ``__cuda_array_interface__`` dict of a device array."""
    desc: dict[str, Any] = array.__cuda_array_interface__
    return desc


def view(
    array: Any, shape: Sequence[int], strides: Sequence[int], offset: int = 0, dtype: npt.DTypeLike | None = None
) -> Any:
    """A zero-copy view of ``array``'s memory with new shape and byte strides.

    Parameters
    ----------
    array : device array
        Any array of this target.
    shape, strides : tuple of int
        The view's shape and strides in bytes (strides may be negative).
    offset : int
        Bytes from ``array``'s data pointer to the view's first element.
    dtype : numpy dtype, optional
        The view's element type (default: ``array``'s); the allocator hands
        out bytes that :func:`fastbn.backends.cuda.context.device_array`
        views as the type it was asked for.
    """
    desc = dict(array.__cuda_array_interface__)
    pointer, readonly = desc["data"]
    desc.update(shape=tuple(shape), strides=tuple(strides), data=(pointer + offset, readonly), stream=None)
    if dtype is not None:
        desc["typestr"] = np.dtype(dtype).str
    if SIMULATOR:
        return _sim_from_interface(desc, array)
    return cuda.as_cuda_array(_Interface(desc, array), sync=False)


def host_view(array: Any) -> npt.NDArray[Any]:
    """Simulator only: the NumPy array that is a simulated device array's memory."""
    memory: npt.NDArray[Any] = array._ary
    return memory


def memset(array: Any, value: int, nbytes: int, stream: Any) -> None:
    """Set the first ``nbytes`` bytes of a device array to the byte ``value``, asynchronously on ``stream``."""
    _submodule("cudadrv.driver").device_memset(array, value, nbytes, stream=stream)


def wrap_allocation(block: Any, size: int) -> Any:
    """A 1-D uint8 device array over a raw allocation of the current context (``block`` kept alive by it)."""
    devicearray, driver = _submodule("cudadrv.devicearray"), _submodule("cudadrv.driver")
    memory = driver.MemoryPointer(cuda.current_context(), block.device_pointer, size=size, owner=block)
    return devicearray.DeviceNDArray(shape=(size,), strides=(1,), dtype=np.dtype(np.uint8), gpu_data=memory)


def current_device_ordinal() -> int | None:
    """The ordinal of the device whose context is current on this thread, or None if none is (no context made)."""
    driver = _submodule("cudadrv.driver").driver
    if not int(driver.cuCtxGetCurrent()):
        return None
    return int(driver.cuCtxGetDevice())


def device_of_pointer(pointer: int) -> int:
    """The ordinal of the CUDA device whose memory ``pointer`` points into (unified addressing)."""
    driver = _submodule("cudadrv.driver")
    attribute = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(driver.driver.cuPointerGetAttribute(attribute, driver.binding.CUdeviceptr(int(pointer))))


# ----------------------------------------------------- compilation, no GPU ---
def compile_ptx(func: Callable[..., Any], argtypes: Iterable[Any], cc: Iterable[int]) -> str:
    """PTX for kernel ``func`` with argument types ``argtypes`` on compute capability ``cc``.

    Runs the target's real NVVM compiler; no GPU or driver is needed (the
    ``cu13`` extra of numba-cuda carries NVVM).
    """
    if MLIR and not cuda.is_available():
        # numba-cuda-mlir 0.6 asks the driver for the current device's compute
        # capability even when ``cc`` is given (to choose the linker's
        # target); with no GPU, tell its private cache the capability asked for.
        import numba_cuda_mlir.tools as mlir_tools

        mlir_tools._cached_cc = tuple(cc)
    ptx: str
    ptx, _ = cuda.compile_ptx(func, tuple(argtypes), cc=tuple(cc))
    return ptx


def compiler_paths() -> dict[str, str]:
    """The files of the compiler that numba-cuda compiles with in this process.

    Loads NVVM if it is not loaded yet.

    Returns
    -------
    dict
        ``nvvm`` (the libNVVM shared library) and ``libdevice`` (the bitcode
        math library linked into every kernel), absolute paths.
    """
    paths = _submodule("cuda_paths").get_cuda_paths()
    return {"nvvm": paths["nvvm"].info, "libdevice": paths["libdevice"].info}


def libdevice_beside(nvvm_path: str) -> str | None:
    """The ``libdevice.10.bc`` of the toolkit that the libNVVM at ``nvvm_path`` belongs to, or None.

    Every toolkit layout keeps it in ``nvvm/libdevice`` under the toolkit
    root, and libNVVM one or two folders below that root: ``lib/`` in the
    CUDA 13 wheels, ``nvvm/lib64/`` in the CUDA 12 wheel and system installs.
    """
    folder = os.path.dirname(os.path.realpath(nvvm_path))
    for _ in range(3):
        candidate = os.path.join(folder, "nvvm", "libdevice", "libdevice.10.bc")
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def _pair_libdevice_with_nvvm() -> None:
    """Make numba-cuda link the libdevice of the NVVM it loaded.

    numba-cuda 0.30 looks for libNVVM and libdevice separately: libNVVM
    through cuda-pathfinder (CUDA 13's wheel first), but libdevice from the
    ``nvidia-cuda-nvcc-cu12`` wheel whenever that is installed, before CUDA
    13's.  fastbn[ptx-cu12] installs both (the CUDA 12 one for ``python -m fastbn
    ptx``, see :mod:`fastbn.tools.cuda12`), which would pair CUDA 13's NVVM with
    CUDA 12's libdevice.  This wraps numba-cuda's wheel lookup so that it
    answers the libdevice beside the loaded libNVVM, and falls back to its
    own answer when there is none.
    """
    try:
        # By name: cuda-python has no annotations, and mypy given tests/ would take tests/cuda for it.
        pathfinder = importlib.import_module("cuda.pathfinder")
        from numba.cuda import cuda_paths

        wheel_libdevice = cuda_paths.get_libdevice_wheel_path
    except (ImportError, AttributeError):  # another numba-cuda: leave its lookup alone
        return
    if getattr(wheel_libdevice, "_fastbn", False):
        return

    def libdevice_of_loaded_nvvm() -> str | None:
        try:
            found = libdevice_beside(pathfinder.load_nvidia_dynamic_lib("nvvm").abs_path)
        except Exception:
            found = None
        return found or wheel_libdevice()

    libdevice_of_loaded_nvvm._fastbn = True  # type: ignore[attr-defined]  # a marker on the function object
    cuda_paths.get_libdevice_wheel_path = libdevice_of_loaded_nvvm


if not SIMULATOR and not MLIR:
    _pair_libdevice_with_nvvm()


def supported_ccs() -> list[tuple[int, ...]] | None:
    """The compute capabilities the installed toolkit compiles for, or None if unknown."""
    try:
        nvrtc = _submodule("cudadrv.nvrtc")
        return sorted(tuple(cc) for cc in nvrtc.get_supported_ccs())
    except Exception:
        return None


def toolkit_version() -> str:
    """The CUDA toolkit version of the installed compiler libraries, as a string ("13.5"), or "unknown"."""
    try:
        nvjitlink = importlib.import_module("cuda.bindings.nvjitlink")  # by name, as cuda.pathfinder above

        return ".".join(str(part) for part in nvjitlink.version())
    except Exception:
        return "unknown"
