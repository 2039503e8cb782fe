"""The one place that decides how fastbn's CPU kernels and helpers are compiled.

Imported by the CPU kernel modules, which are imported on the first kernel
call, so ``import fastbn`` neither imports Numba nor compiles anything.
Every fast-math flag the CPU backend uses is set here, and the rule that a
kernel works on borrowed copies of its arguments (:func:`borrowed`).

Compilation is announced on the ``fastbn.compile`` logger (silent unless the
application configures logging): an INFO line when a kernel is about to be
compiled, naming it, its signature in words and why it is not loaded from the
disk cache, and one when it is compiled, with the time taken; a DEBUG line for
each kernel loaded from the cache.  Each record carries the fields
``fastbn_event`` (``"compile"``, ``"compiled"``, ``"compile-failed"``,
``"load"``), ``fastbn_kernel``, ``fastbn_signature`` and ``fastbn_cache`` (the
cache directory, or None; and ``fastbn_reason``, ``fastbn_seconds``), which ``python -m fastbn precompile``
counts.  A missing or unusable cache directory, and a cache that fails,
warn once per process (:class:`KernelCacheWarning`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import pickle
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, overload

import numba
import numba.core.caching
import numba.core.event
import numba.core.ir_utils
from numba.core import types as nbtypes
from numba.extending import intrinsic

from fastbn.backends import sources_hash

try:
    import fcntl
except ImportError:  # Windows: cache writes are not locked across processes (Numba's own behaviour)
    fcntl = None  # type: ignore[assignment]  # no module there: checked before each use

#: Compilation and cache events of the CPU kernels (see the module docstring).
log = logging.getLogger("fastbn.compile")
logging.getLogger("fastbn").addHandler(logging.NullHandler())

# Why these flags: 'reassoc' lets LLVM split a float accumulation into vector
# lanes (the reductions are memory-bound only once vectorised); 'contract'
# allows FMA; 'nsz' ignores the sign of zero.  Never 'nnan'/'ninf': they let
# LLVM assume no NaN/Inf, which would break PyTorch's NaN propagation.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})

# The elementwise helpers and the per-channel coefficients are compiled
# without 'reassoc' or 'contract', because several callers must get the same
# bits from them: both SLAB strategies, and ordinary and non-temporal stores.
# With 'reassoc', LLVM may order a three-term sum (the residual add, dx's two
# subtractions) differently in two kernels; without 'contract' every
# operation is rounded as written, whatever LLVM inlines or vectorises.  They
# still vectorise (there is no reduction), and an FMA saves nothing in a pass
# bound by memory.
ELEMENTWISE_FASTMATH = frozenset(FASTMATH & {"nsz"})


@overload
def kernel(func: Callable[..., Any], *, parallel: bool = True) -> Any: ...


@overload
def kernel(func: None = None, *, parallel: bool = True) -> Callable[[Callable[..., Any]], Any]: ...


def kernel(func: Callable[..., Any] | None = None, *, parallel: bool = True) -> Any:
    """Compile ``func`` lazily with Numba, cached on disk when possible.

    Parameters
    ----------
    func : callable
        The Python function to compile.  Compilation happens on the first call
        for each argument type signature, never at decoration.
    parallel : bool, default True
        Whether ``prange`` loops run on Numba's threading layer.

    Returns
    -------
    numba.core.registry.CPUDispatcher
        The dispatcher.  If no writable cache directory exists (read-only
        install and home directory, or ``NUMBA_CACHE_DIR`` unusable), caching
        is turned off for it instead of failing, and the process's first
        compilation warns (:class:`KernelCacheWarning`).
    """
    if func is None:
        return lambda f: kernel(f, parallel=parallel)
    options = dict(parallel=parallel, fastmath=set(FASTMATH), nogil=True)
    try:
        dispatcher = numba.njit(cache=True, **options)(func)
    except RuntimeError:
        # Numba raises RuntimeError("cannot cache function ...: no locator
        # available") when no cache directory is writable.
        dispatcher = numba.njit(cache=False, **options)(func)
        dispatcher._fastbn_uncached = _NO_DIRECTORY
        return dispatcher
    _stamp_with_backend_sources(dispatcher)
    _verify_cache_files(dispatcher)
    dispatcher._cache = _FallbackCache(dispatcher, dispatcher._cache)
    return dispatcher


def serial_twin(dispatcher: Any) -> Any:
    """The kernel behind ``dispatcher`` compiled again with ``parallel=False``: its ``prange`` loops run on
    the calling thread, with no launch on the threading layer.

    For small calls (:mod:`fastbn.backends.cpu.small`), which call it from a
    kernel of their own.  It runs the same code and the same compiled helpers
    (the reductions and merges have one compiled copy each, see
    :func:`reduction`), in the same order, so it gives the parallel kernel's
    result bit for bit.  The twin is a copy of the Python function under its
    own name, ``<name>_serial``, so that its disk-cache entries never mix
    with the parallel kernel's (Numba's cache index does not tell them apart
    by their flags).
    """
    func = dispatcher.py_func
    twin = types.FunctionType(func.__code__, func.__globals__, f"{func.__name__}_serial", func.__defaults__)
    twin.__qualname__ = f"{func.__qualname__}_serial"
    twin.__module__ = func.__module__
    twin.__doc__ = func.__doc__
    return kernel(twin, parallel=False)


# --------------------------------------------------------------- warnings ---
class KernelCacheWarning(RuntimeWarning):
    """The CPU kernels' disk cache is missing, unusable or failed: kernels are compiled without it."""


_warned = threading.Event()
_INTERNAL = ("fastbn.", "numba.", "numba_cuda.", "contextlib")
_NO_DIRECTORY = "caching unavailable: no writable cache directory"


def _user_stacklevel() -> int:
    """The stack level of the first frame outside fastbn and Numba, as ``warnings.warn`` counts from its caller."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _warn(message: str) -> None:
    """Warn once per process about the kernel cache (later problems are only logged)."""
    if not _warned.is_set():
        _warned.set()
        warnings.warn(f"fastbn: {message}", KernelCacheWarning, stacklevel=_user_stacklevel())


def _warn_once(exc: BaseException) -> None:
    _warn(
        f"the kernel cache on disk failed ({type(exc).__name__}: {exc}); kernels that cannot use it are "
        "compiled without it (set NUMBA_CACHE_DIR to a writable directory)"
    )


def _numba_cache_dir() -> str:
    return numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR", "")


def _check_cache_directory(dispatcher: Any) -> None:
    """At a kernel's compilation: warn once if it has no cache directory, or not the one NUMBA_CACHE_DIR names."""
    if _warned.is_set():
        return
    if getattr(dispatcher, "_fastbn_uncached", None) == _NO_DIRECTORY:
        from numba.misc.appdirs import AppDirs

        named = _numba_cache_dir()
        tried = [
            f"NUMBA_CACHE_DIR={named}" if named else "NUMBA_CACHE_DIR (not set)",
            os.path.join(os.path.dirname(os.path.abspath(inspect.getfile(dispatcher.py_func))), "__pycache__"),
            AppDirs(appname="numba", appauthor=False).user_cache_dir,
        ]
        _warn(
            f"no writable directory for the kernel cache (tried {', '.join(tried)}): every process compiles "
            "the kernels it uses again, a few seconds each on their first call; set NUMBA_CACHE_DIR to a "
            "writable directory"
        )
        return
    named = _numba_cache_dir()
    cache = dispatcher._cache
    if named and isinstance(cache, _FallbackCache):
        locator = getattr(getattr(cache._cache, "_impl", None), "locator", None)
        provided = getattr(numba.core.caching, "UserProvidedCacheLocator", None)
        if provided is not None and locator is not None and not isinstance(locator, provided):
            _warn(
                f"NUMBA_CACHE_DIR={named} is not a writable directory: the kernel cache is in "
                f"{cache._cache._cache_path} instead (set NUMBA_CACHE_DIR to a writable directory, or unset it)"
            )


# ---------------------------------------------------------------- logging ---
_HALF_TYPES = {"uint16": "float16", "int16": "bfloat16"}  # how the kernels see half types (views.as_kernel_dtype)
_LAYOUTS = {3: "SLAB (N, C, L)", 2: "ROWS (M, C)", 1: "per-channel"}
_OPTIONAL = {"z": "residual", "m": "ReLU mask", "dres": "residual gradient", "nt": "non-temporal stores"}


@functools.cache
def _parameters(py_func: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(inspect.signature(py_func).parameters)


def _name(dispatcher: Any) -> str:
    return f"{dispatcher.py_func.__module__.rsplit('.', 1)[-1]}.{dispatcher.py_func.__name__}"


def _describe(py_func: Callable[..., Any], args: Sequence[Any]) -> str:
    """A kernel signature in words: the data's dtype and kernel layout, and which optional inputs are arrays.

    The data is x or dy, else the parameters (the per-channel kernels take float64 statistics beside
    parameters in the statistics dtype), else the array of largest rank.
    """
    named = list(zip(_parameters(py_func), args))
    arrays = {n: t for n, t in named if isinstance(t, nbtypes.Array)}
    if not arrays:
        return ", ".join(str(t) for t in args)
    key = next((n for n in ("x", "dy", "weight", "running_mean") if n in arrays), None)
    data = arrays[key] if key else max(arrays.values(), key=lambda t: t.ndim)
    words = [_HALF_TYPES.get(str(data.dtype), str(data.dtype)), _LAYOUTS.get(data.ndim, f"{data.ndim}-D")]
    words += [_OPTIONAL[n] for n in arrays if n in _OPTIONAL]
    return ", ".join(words)


def _record(event: str, dispatcher: Any, args: Iterable[Any], **fields: Any) -> dict[str, Any]:
    extra = {
        "fastbn_event": event,
        "fastbn_kernel": _name(dispatcher),
        "fastbn_signature": str(tuple(args)),
        "fastbn_cache": _cache_path(dispatcher),
    }
    extra.update({f"fastbn_{key}": value for key, value in fields.items()})
    return extra


def _cache_path(dispatcher: Any) -> str | None:
    cache = dispatcher._cache
    return getattr(cache._cache, "_cache_path", None) if isinstance(cache, _FallbackCache) else None


def _compile_reason(dispatcher: Any) -> str:
    cache = dispatcher._cache
    if isinstance(cache, _FallbackCache):
        return cache.miss_reason or "not in the disk cache"
    return getattr(dispatcher, "_fastbn_uncached", None) or "not cached on disk"


class _CompileLog(numba.core.event.Listener):  # type: ignore[misc]  # Numba is not followed: Any
    """Logs the compilations of fastbn's kernels (Numba's ``numba:compile`` events, under its compiler lock)."""

    def __init__(self) -> None:
        self._started: dict[tuple[int, tuple[Any, ...]], float] = {}

    def notify(self, event: Any) -> None:
        try:
            super().notify(event)
        except Exception:
            if isinstance(sys.exc_info()[1], Warning):  # warnings turned into errors by the application
                raise
            log.debug("logging a compilation failed", exc_info=True)

    @staticmethod
    def _ours(event: Any) -> bool:
        dispatcher = event.data["dispatcher"]
        return hasattr(dispatcher, "_fastbn_uncached") or isinstance(
            getattr(dispatcher, "_cache", None), _FallbackCache
        )

    def on_start(self, event: Any) -> None:
        if not self._ours(event):
            return
        dispatcher, args = event.data["dispatcher"], tuple(event.data["args"])
        _check_cache_directory(dispatcher)
        reason = _compile_reason(dispatcher)
        self._started[id(dispatcher), args] = time.perf_counter()
        log.info(
            "compiling CPU kernel %s (%s): %s",
            _name(dispatcher),
            _describe(dispatcher.py_func, args),
            reason,
            extra=_record("compile", dispatcher, args, reason=reason),
        )
        log.debug("signature of %s: %s", _name(dispatcher), args)

    def on_end(self, event: Any) -> None:
        if not self._ours(event):
            return
        dispatcher, args = event.data["dispatcher"], tuple(event.data["args"])
        started = self._started.pop((id(dispatcher), args), None)
        seconds = time.perf_counter() - started if started is not None else float("nan")
        words = _describe(dispatcher.py_func, args)
        failure = (getattr(event, "_exc_details", None) or (None,))[0]  # Numba's is_failed is unreliable
        if failure is not None:
            log.info(
                "compiling CPU kernel %s (%s) failed after %.2f s: %s",
                _name(dispatcher),
                words,
                seconds,
                failure.__name__,
                extra=_record("compile-failed", dispatcher, args, seconds=seconds),
            )
            return
        path = _cache_path(dispatcher)
        # Numba saves the kernel after this event: whether that worked is logged by the save.
        where = f"; saving it to the disk cache in {path}" if path else "; not cached on disk"
        log.info(
            "compiled CPU kernel %s (%s) in %.2f s%s",
            _name(dispatcher),
            words,
            seconds,
            where,
            extra=_record("compiled", dispatcher, args, seconds=seconds),
        )


numba.core.event.register("numba:compile", _CompileLog())


class _FallbackCache:
    """A kernel's disk cache whose failures never fail a call.

    Numba lets an unreadable or corrupt cache file (a truncated write, a full
    disk) or a cache directory that became unwritable raise out of the
    kernel call, on every call.  Here a failed read rewrites the kernel's
    index empty, so that the kernel is compiled and cached afresh (the cache
    heals); a failed write, or a failed rewrite, switches caching off for
    that kernel in this process.  Either way the call goes on, and the first
    failure in the process is reported once as a RuntimeWarning.  The files
    are checksummed (:class:`_VerifiedCacheFile`), so a corrupt one is found
    before Numba links the code inside it.  A MemoryError while loading is
    not a cache fault: it propagates, and the cache is left as it is.
    """

    def __init__(self, dispatcher: Any, cache: Any) -> None:
        self._dispatcher = dispatcher
        self._cache = cache
        # Why the last load found nothing, in words (logged when the kernel compiles).
        self.miss_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def _give_up(self, exc: BaseException, why: str = "the cache failed") -> None:
        _warn_once(exc)
        self._dispatcher._cache = numba.core.caching.NullCache()
        self._dispatcher._fastbn_uncached = (
            f"{why} ({type(exc).__name__}: {exc}); caching is off for this kernel in this process"
        )

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        self.miss_reason = None
        try:
            result = self._cache.load_overload(sig, target_context)
        except MemoryError:
            # Not a fault of the cache (its files are checksummed): compiling
            # instead would need far more memory (and LLVM aborts the
            # process when it runs out), and rewriting the index would throw
            # a good cache away.  The call fails cleanly; the next one retries.
            raise
        except Exception as exc:  # any cache fault: compile instead
            self.miss_reason = f"cache file corrupt or unreadable ({type(exc).__name__}: {exc}); compiling it again"
            _warn_once(exc)
            try:
                self._cache.flush()  # an empty index: the entry is compiled and saved again
            except Exception as flush_exc:
                self._give_up(flush_exc, f"the cache file was corrupt or unreadable ({exc}) and rewriting it failed")
            return None
        if result is None:
            self.miss_reason = getattr(getattr(self._cache, "_cache_file", None), "miss_reason", None)
        elif log.isEnabledFor(logging.DEBUG):
            args = tuple(getattr(sig, "args", sig))
            log.debug(
                "loaded CPU kernel %s (%s) from the disk cache in %s",
                _name(self._dispatcher),
                _describe(self._dispatcher.py_func, args),
                getattr(self._cache, "_cache_path", "?"),
                extra=_record("load", self._dispatcher, args),
            )
        return result

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            self._cache.save_overload(sig, data)
        except Exception as exc:  # any cache fault: run uncached
            self._give_up(exc)
            log.info(
                "saving CPU kernel %s to the disk cache failed (%s: %s); caching is off for this kernel, this process",
                _name(self._dispatcher),
                type(exc).__name__,
                exc,
            )


def _backend_sources_hash() -> bytes:
    """SHA-256 of every source file of the CPU backend, in name order (:func:`fastbn.backends.sources_hash`)."""
    return sources_hash(os.path.dirname(os.path.abspath(__file__)))


def _stamp_with_backend_sources(dispatcher: Any) -> None:
    """Key the kernel's disk cache on all of the backend's sources, not only its own file.

    Numba invalidates a cached kernel when the source file of the kernel
    itself changes, but not when a helper it inlines from another file
    (``loops.py``, ``numerics.py``, the constants of ``plan.py``) does; a
    stale kernel would then run old code.  The stamp is private to Numba's
    cache, so another Numba keeps its own (per-file) rule.
    """
    with contextlib.suppress(AttributeError):
        dispatcher._cache._cache_file._source_stamp = _backend_sources_hash()


class _VerifiedCacheFile(numba.core.caching.IndexDataCacheFile):  # type: ignore[misc]  # Numba is not followed: Any
    """Numba's index and data files, each payload preceded by its SHA-256 and checked on every load.

    A data file also holds the index key it was saved under, checked on load.

    Numba unpickles a data file and links the machine code inside it as it
    is: a flipped bit there (a bad disk, a copy cut short and patched up)
    crashed the process in 5 of 30 random flips tried (SIGSEGV or SIGABRT)
    and went unnoticed in 17.  A mismatch here is a ValueError, which
    :class:`_FallbackCache` handles as any corrupt file: warn once, compile,
    rewrite.  The index carries its own version tag, so that files written
    without checksums read as another version's (an empty index) and are
    replaced silently.

    Several processes may fill one cache at once (``python -m fastbn
    precompile``, data-loader workers, one process per GPU).  Numba reads
    the index, adds an entry and writes it back, and numbers data files by
    what that index holds, so two processes saving two signatures of one
    kernel could each drop the other's entry, or pair one's index entry with
    the other's data file.  Here saving holds an exclusive ``flock`` on
    ``fastbn.lock`` in the cache directory and loading a shared one (no lock
    where the lock file cannot be opened, e.g. a read-only cache, which no
    process writes either, or on Windows).

    A load that finds nothing leaves the reason in :attr:`miss_reason`, which
    the compilation log gives.
    """

    _DIGEST = hashlib.sha256().digest_size
    VERSION_TAG = "+fastbn-sha256-keyed"
    LOCK_NAME = "fastbn.lock"
    miss_reason: str | None = None
    _index_state: str | None = None

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd: int | None = None
        if fcntl is not None:
            path = os.path.join(self._cache_path, self.LOCK_NAME)
            for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
                try:
                    fd = os.open(path, flags, 0o666)
                    break
                except OSError:
                    continue
        try:
            if fd is not None:
                with contextlib.suppress(OSError):  # a file system without locks: unlocked, as Numba is
                    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def save(self, key: Any, data: Any) -> None:
        # The data file holds its own index key beside the code: checked on load, so that an intact file in
        # another entry's place (files swapped or renumbered by a copy) is a fault, not another signature's
        # machine code called with this one's arguments.
        with self._locked(exclusive=True):
            super().save(key, (key, data))

    def flush(self) -> None:
        with self._locked(exclusive=True):
            super().flush()

    def load(self, key: Any) -> Any:
        # Numba's load, under the shared lock, noting why nothing was found.
        with self._locked(exclusive=False):
            self.miss_reason = None
            overloads = self._load_index()
            data_name = overloads.get(key)
            if data_name is None:
                self.miss_reason = self._why_missing(key, overloads)
                return None
            try:
                stored = self._load_data(data_name)
            except OSError:  # Numba's "index names a missing file": a miss
                self.miss_reason = "the cache index names a data file that is missing"
                return None
            if not (isinstance(stored, tuple) and len(stored) == 2 and stored[0] == key):
                raise ValueError(f"{self._data_path(data_name)} holds another cache entry than its index names")
            return stored[1]

    def _why_missing(self, key: Any, overloads: dict[Any, Any]) -> str:
        if self._index_state == "stale":
            return "cache stale: fastbn's CPU backend sources changed since it was written"
        if self._index_state == "version":
            return "cache written by another Numba or fastbn version"
        for sig, magic, _ in overloads:
            if sig == key[0] and magic != key[1]:
                return f"cached only for another CPU ({magic[1]}, not {key[1][1]})"
            if sig == key[0]:
                return "cache entry stale: the kernel's code changed"
        return "no cache entry yet"

    def _dump(self, obj: Any) -> bytes:
        payload: bytes = super()._dump(obj)
        return hashlib.sha256(payload).digest() + payload

    def _verified(self, data: bytes, path: str) -> bytes:
        digest, payload = data[: self._DIGEST], data[self._DIGEST :]
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"checksum mismatch in {path} (a truncated or corrupt cache file)")
        return payload

    def _load_index(self) -> dict[Any, Any]:
        # Numba's _load_index, with the payload verified before it is unpickled.
        self._index_state = "missing"
        try:
            with open(self._index_path, "rb") as f:
                version = pickle.load(f)
                data = f.read()
        except FileNotFoundError:
            return {}
        if version != self._version:
            self._index_state = "version"
            return {}
        overloads: dict[Any, Any]
        stamp, overloads = pickle.loads(self._verified(data, self._index_path))
        if stamp != self._source_stamp:
            self._index_state = "stale"
            return {}
        self._index_state = "ok"
        return overloads

    def _load_data(self, name: str) -> Any:
        path = self._data_path(name)
        with open(path, "rb") as f:  # an OSError here is Numba's "index names a missing file": a miss
            data = f.read()
        return pickle.loads(self._verified(data, path))


def _verify_cache_files(dispatcher: Any) -> None:
    """Checksum the kernel's cache files (:class:`_VerifiedCacheFile`), where Numba's layout is the known one."""
    try:
        cache_file = dispatcher._cache._cache_file
    except AttributeError:
        return
    if type(cache_file) is numba.core.caching.IndexDataCacheFile:
        cache_file.__class__ = _VerifiedCacheFile
        cache_file._version = f"{cache_file._version}{_VerifiedCacheFile.VERSION_TAG}"


def inline(func: Callable[..., Any]) -> Any:
    """Compile a small helper that kernels call; inlined into them at Numba's level."""
    return numba.njit(fastmath=set(FASTMATH), inline="always")(func)


def reduction(func: Callable[..., Any]) -> Any:
    """Compile a per-run reduction once per signature, as a function of its own, with fast-math.

    Every kernel that reduces runs calls the same compiled copy: inlined at
    Numba's level, each kernel would get its own copy of the loop for LLVM to
    vectorise, and two copies may sum in different lane orders, giving
    float64 sums 1 ulp apart between strategies.  LLVM may still inline the
    compiled copy into a caller when the caller's module is finalised, and
    does so kernel by kernel (in ``stats_slab_streamed``, one run's sum is a
    call and its squared deviations are inlined), so one compiled copy does
    not by itself fix the order in every kernel.  Marking these ``noinline``
    (a lowering pass of fastbn's own) was tried and measured: the medians of
    the SLAB calls with runs of 9 to 3136 elements came out 5-20% slower in
    most rows (this machine's noise between runs is up to 30%), and no
    difference between plans has been reproduced that it would cure (issue
    16), so it is not done.
    """
    return numba.njit(fastmath=set(FASTMATH))(func)


def elementwise(func: Callable[..., Any]) -> Any:
    """Compile an elementwise helper or coefficient formula without 'reassoc' and 'contract' (see above)."""
    return numba.njit(fastmath=set(ELEMENTWISE_FASTMATH))(func)


def exact(func: Callable[..., Any]) -> Any:
    """Compile a merge without fast-math (LLVM still inlines it): every caller gets the same bits.

    ``fastmath=False`` is explicit because Numba otherwise lets a callee
    inherit its caller's fast-math flags when the callee is first compiled
    while typing the caller: the kernels' 'reassoc' then reached the merges
    and the overflow rescue (folding ``(v * 2^600) * 2^600`` into ``v * inf``).
    """
    return numba.njit(fastmath=False)(func)


# ------------------------------------------------------- borrowed views ---
# Every Numba array carries a pointer to its buffer's reference count (its
# meminfo), and every view of it (x[n, c], x[n, c, i0:i1]) increments and
# decrements that count with locked instructions, inside a prange body too.
# A kernel's threads share its arguments, so each view bounced the count's
# cache line between the cores: on a (256, 256, 14, 14) float16 input the
# counts' updates took 7% of eval forward, and 28% of the statistics, which
# also sliced a scratch array of their own per run (perf, on the Xeon).  A
# kernel's arguments are owned by its caller for the whole call, so a kernel
# rebinds each argument its prange bodies use to a borrowed copy, with no
# meminfo, whose views update nothing (NRT_incref and NRT_decref skip a null
# meminfo).  An array the kernel allocates may be borrowed the same way only
# while the kernel holds the owner, which :func:`kept` marks.
# (tests/test_structure.py checks both rules.)
@intrinsic  # type: ignore[untyped-decorator]  # numba.extending.intrinsic is unannotated
def borrowed(typingctx: Any, value: Any) -> Any:
    """``value`` itself, but an array without its reference count (see above); anything else unchanged.

    Only for an array the caller keeps alive until the last use of the
    borrowed copy and its views.
    """
    sig = value(value)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        if not isinstance(value, nbtypes.Array):
            context.nrt.incref(builder, value, args[0])  # returned as a new reference, as Numba expects
            return args[0]
        view = context.make_array(value)(context, builder, value=args[0])
        view.meminfo = context.get_constant_null(nbtypes.MemInfoPointer(value.dtype))
        view.parent = context.get_constant_null(nbtypes.pyobject)
        return view._getvalue()

    return sig, codegen


def _borrowed_aliases(lhs: str, args: Sequence[Any], alias_map: dict[str, set[str]], arg_aliases: set[str]) -> None:
    # Numba's alias analysis (numba.core.ir_utils.find_potential_aliases) must know that the copy is
    # the same memory: otherwise its dead-code elimination drops stores through the copy into an
    # output argument, whose result it takes for a local array nobody reads.
    rhs = args[0].name
    if rhs in arg_aliases:
        arg_aliases.add(lhs)
    else:
        alias_map.setdefault(rhs, set()).add(lhs)
        alias_map.setdefault(lhs, set()).add(rhs)


numba.core.ir_utils.alias_func_extensions[("borrowed", __name__)] = _borrowed_aliases


@intrinsic  # type: ignore[untyped-decorator]  # numba.extending.intrinsic is unannotated
def kept(typingctx: Any, array: Any) -> Any:
    """Nothing: a use of ``array`` that keeps it alive until here, for :func:`borrowed` copies of it."""
    sig = nbtypes.none(array)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return context.get_dummy_value()

    return sig, codegen
