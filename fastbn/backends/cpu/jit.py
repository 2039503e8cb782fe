"""The one place that decides how fastbn's CPU kernels and helpers are compiled.

Imported by the CPU kernel modules, which are imported on the first kernel
call, so ``import fastbn`` neither imports Numba nor compiles anything.
Every fast-math flag the CPU backend uses is set here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import threading
import warnings

import numba
import numba.core.caching

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


def kernel(func=None, *, parallel=True):
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
        is turned off for it instead of failing.
    """
    if func is None:
        return lambda f: kernel(f, parallel=parallel)
    options = dict(parallel=parallel, fastmath=set(FASTMATH), nogil=True)
    try:
        dispatcher = numba.njit(cache=True, **options)(func)
    except RuntimeError:
        # Numba raises RuntimeError("cannot cache function ...: no locator
        # available") when no cache directory is writable.
        return numba.njit(cache=False, **options)(func)
    _stamp_with_backend_sources(dispatcher)
    _verify_cache_files(dispatcher)
    dispatcher._cache = _FallbackCache(dispatcher, dispatcher._cache)
    return dispatcher


_warned = threading.Event()


def _warn_once(exc):
    if not _warned.is_set():
        _warned.set()
        warnings.warn(f"fastbn: the kernel cache on disk failed ({type(exc).__name__}: {exc}); kernels that "
                      "cannot use it are compiled without it (set NUMBA_CACHE_DIR to a writable directory)",
                      RuntimeWarning, stacklevel=4)


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

    def __init__(self, dispatcher, cache):
        self._dispatcher = dispatcher
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def _give_up(self, exc):
        _warn_once(exc)
        self._dispatcher._cache = numba.core.caching.NullCache()

    def load_overload(self, sig, target_context):
        try:
            return self._cache.load_overload(sig, target_context)
        except MemoryError:
            # Not a fault of the cache (its files are checksummed): compiling
            # instead would need far more memory (and LLVM aborts the
            # process when it runs out), and rewriting the index would throw
            # a good cache away.  The call fails cleanly; the next one retries.
            raise
        except Exception as exc:  # any cache fault: compile instead
            _warn_once(exc)
            try:
                self._cache.flush()  # an empty index: the entry is compiled and saved again
            except Exception as flush_exc:
                self._give_up(flush_exc)
            return None

    def save_overload(self, sig, data):
        try:
            self._cache.save_overload(sig, data)
        except Exception as exc:  # any cache fault: run uncached
            self._give_up(exc)


@functools.cache
def _backend_sources_hash():
    """SHA-256 of every source file of the CPU backend, in name order."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def _stamp_with_backend_sources(dispatcher):
    """Key the kernel's disk cache on all of the backend's sources, not only its own file.

    Numba invalidates a cached kernel when the source file of the kernel
    itself changes, but not when a helper it inlines from another file
    (``loops.py``, ``numerics.py``, the constants of ``plan.py``) does; a
    stale kernel would then run old code.  The stamp is private to Numba's
    cache, so another Numba keeps its own (per-file) rule.
    """
    with contextlib.suppress(AttributeError):
        dispatcher._cache._cache_file._source_stamp = _backend_sources_hash()


class _VerifiedCacheFile(numba.core.caching.IndexDataCacheFile):
    """Numba's index and data files, each payload preceded by its SHA-256 and checked on every load.

    Numba unpickles a data file and links the machine code inside it as it
    is: a flipped bit there (a bad disk, a copy cut short and patched up)
    crashed the process in 5 of 30 random flips tried (SIGSEGV or SIGABRT)
    and went unnoticed in 17.  A mismatch here is a ValueError, which
    :class:`_FallbackCache` handles as any corrupt file: warn once, compile,
    rewrite.  The index carries its own version tag, so that files written
    without checksums read as another version's (an empty index) and are
    replaced silently.
    """

    _DIGEST = hashlib.sha256().digest_size
    VERSION_TAG = "+fastbn-sha256"

    def _dump(self, obj):
        payload = super()._dump(obj)
        return hashlib.sha256(payload).digest() + payload

    def _verified(self, data, path):
        digest, payload = data[:self._DIGEST], data[self._DIGEST:]
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"checksum mismatch in {path} (a truncated or corrupt cache file)")
        return payload

    def _load_index(self):
        # Numba's _load_index, with the payload verified before it is unpickled.
        try:
            with open(self._index_path, "rb") as f:
                version = pickle.load(f)
                data = f.read()
        except FileNotFoundError:
            return {}
        if version != self._version:
            return {}
        stamp, overloads = pickle.loads(self._verified(data, self._index_path))
        if stamp != self._source_stamp:
            return {}
        return overloads

    def _load_data(self, name):
        path = self._data_path(name)
        with open(path, "rb") as f:  # an OSError here is Numba's "index names a missing file": a miss
            data = f.read()
        return pickle.loads(self._verified(data, path))


def _verify_cache_files(dispatcher):
    """Checksum the kernel's cache files (:class:`_VerifiedCacheFile`), where Numba's layout is the known one."""
    try:
        cache_file = dispatcher._cache._cache_file
    except AttributeError:
        return
    if type(cache_file) is numba.core.caching.IndexDataCacheFile:
        cache_file.__class__ = _VerifiedCacheFile
        cache_file._version = f"{cache_file._version}{_VerifiedCacheFile.VERSION_TAG}"


def inline(func):
    """Compile a small helper that kernels call; inlined into them at Numba's level."""
    return numba.njit(fastmath=set(FASTMATH), inline="always")(func)


def reduction(func):
    """Compile a per-run reduction once per signature, as a function of its own, with fast-math.

    Every kernel that reduces runs calls the same compiled copy: inlined at
    Numba's level, each kernel would get its own copy of the loop for LLVM to
    vectorise, and two copies may sum in different lane orders, giving
    float64 sums 1 ulp apart between strategies.  One compiled copy fixes
    the order.
    """
    return numba.njit(fastmath=set(FASTMATH))(func)


def elementwise(func):
    """Compile an elementwise helper or coefficient formula without 'reassoc' and 'contract' (see above)."""
    return numba.njit(fastmath=set(ELEMENTWISE_FASTMATH))(func)


def exact(func):
    """Compile a merge without fast-math (LLVM still inlines it): every caller gets the same bits.

    ``fastmath=False`` is explicit because Numba otherwise lets a callee
    inherit its caller's fast-math flags when the callee is first compiled
    while typing the caller: the kernels' 'reassoc' then reached the merges
    and the overflow rescue (folding ``(v * 2^600) * 2^600`` into ``v * inf``).
    """
    return numba.njit(fastmath=False)(func)
