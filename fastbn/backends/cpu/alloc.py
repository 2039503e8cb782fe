"""A caching allocator for large CPU outputs.

Why
---
fastbn's CPU kernels are memory-bound, and every public call returns a new
output.  A large ``np.empty`` is fresh memory (glibc maps blocks of 32 MB or
more on their own, and gives freed heap memory back to the OS when several
blocks are freed at once): the OS zeroes each page on its first write, which
for a 50 MB output costs about as much as the batch norm's whole DRAM
traffic.  Like
PyTorch's CUDA caching allocator, this module keeps the memory of dead outputs
and hands it to the next output of a similar size, already paged in.

How
---
* :func:`empty` serves requests of :data:`THRESHOLD` bytes or more from a pool
  of private anonymous mappings (``mmap.MAP_PRIVATE``, so a forked child gets
  copy-on-write memory exactly as with ``malloc``), each a multiple of
  :data:`GRANULE` (2 MiB) long, aligned to 2 MiB and marked
  ``MADV_HUGEPAGE``, so that a fresh block pages in as transparent huge pages.
  Smaller requests, and every request while the pool is disabled, get plain
  ``np.empty``.
* A handed-out block is wrapped in a ctypes ``c_char`` array made with
  ``from_buffer`` on the block's ``mmap`` object, and the NumPy array is built
  on that ctypes object (``np.ndarray(..., buffer=...)``).  The ctypes object
  is the base of that array, and every view, reshape, ``np.asarray``,
  ``memoryview`` or ``torch.from_numpy`` of it keeps a reference to it through
  the chain of ``.base`` objects.  A weak reference to the ctypes object
  returns the block to the pool when the object dies, that is once nothing
  refers to the memory any more.  NumPy arrays are not tracked by the cyclic
  garbage collector, so the ctypes object, which only arrays refer to, dies
  by reference counting when the last array does: for arrays in a reference
  cycle that is after the cycle's finalizers ran, so ``__del__`` methods
  still see intact memory.  The ctypes object also holds a buffer export
  of the ``mmap``, so a mapping is never unmapped while any array on it lives,
  whatever the pool does: evicting a block only drops the pool's reference.
* A returned block is reused for a later request if it is at least as large
  as the request rounded up to 2 MiB and at most :data:`MAX_WASTE` times as
  large (best fit: the smallest such block, the most recently returned on a
  tie, since its lines may still be in cache).
* Free (cached) bytes are capped; beyond the cap the least recently returned
  blocks are unmapped.  The cap is ``FASTBN_POOL_BYTES`` if set (bytes, or
  with a ``K``/``M``/``G`` suffix, powers of 1024), else
  ``min(1 GiB, memory / 8)`` with memory the physical RAM or the cgroup limit,
  whichever is smaller.  ``FASTBN_POOL_BYTES=0`` disables the pool: every
  output is a plain ``np.empty``.  Only free blocks count; live arrays are the
  caller's.
* :func:`empty_cache` (exported as ``fastbn.empty_cache``) unmaps every free
  block.

Thread and fork safety: all pool state changes under one lock.  The weak
reference callback, which may run at any allocation inside the interpreter
(also inside this module, while the lock is held), never waits for the lock:
it queues the block and files it only if the lock is free; whoever holds
the lock files the queue right after letting go.  ``os.register_at_fork``
takes the lock around ``fork``, and the child starts with a new lock and an
empty free list (its copies of the parent's live arrays still return to its
own pool when they die).

Signals: a Python signal handler runs between any two calls of this code
(in the main thread) and may raise (KeyboardInterrupt, a timeout's
exception).  The lock is reentrant, taken only by ``with`` or by a guarded
non-blocking ``acquire``, so such an exception never leaves it held; the
LRU map is the record of free blocks, and an exception part-way through a
change rebuilds the size index and the byte count from it; a block whose
return was cut short is lost to the pool (unmapped), never handed out
twice, and dead arrays whose weak-reference callback was cut short are
found again by :meth:`Pool.stats` and :meth:`Pool.empty_cache`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import itertools
import math
import mmap
import operator
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex, cast

import numpy as np
import numpy.typing as npt

from fastbn.backends.cpu.machine import memory_bytes

#: Requests of at least this many bytes come from the pool.  Below it the
#: pool's Python overhead (about 10 us a call) would be a noticeable part of
#: a batch norm on the array (0.3 ms at 1 MiB), and a block would waste more
#: than half of its 2 MiB huge page.  It is not higher because glibc recycles
#: smaller blocks only while they are freed one at a time: when several are
#: freed at once (a network's outputs after its backward pass) it trims its
#: heap and the next ones page in again.  Measured on 2 cores, a training
#: forward whose outputs are kept 8 at a time took 1.7-2.3x as long without
#: the pool at 1, 4 and 8 MiB, while in a plain loop the pool made no
#: measurable difference at 1 MiB.
THRESHOLD = 1 << 20

#: Block sizes are multiples of this (the x86-64 transparent huge page size),
#: so that a block is whole huge pages and blocks of nearby sizes are
#: interchangeable.
GRANULE = 2 << 20

#: A free block serves a request (rounded up to GRANULE) only if it is at
#: most this many times as large, so a large block is not tied up by a small
#: array.
MAX_WASTE = 2

#: Plain ``np.empty`` arrays (pool off) of at least this many bytes are taken
#: to be fresh mappings; smaller ones mostly reuse heap memory.
FRESH_BYTES = 4 << 20

#: Environment variable with the cap on free (cached) bytes; 0 disables the pool.
ENV_VAR = "FASTBN_POOL_BYTES"

#: Upper bound of the default cap: about 15 of the largest benchmark outputs
#: (67 MB), the outputs of a modest network's training step.
DEFAULT_CAP = 1 << 30

_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


# ------------------------------------------------------------ the cap ---
def default_cap() -> int:
    """The cap on free bytes when ``FASTBN_POOL_BYTES`` is not set.

    Returns
    -------
    int
        ``min(1 GiB, memory / 8)``, memory being physical RAM or the cgroup
        limit, whichever is smaller (1 GiB if neither is known).  An eighth
        of memory keeps a small machine or container from holding much idle
        memory; 1 GiB caches a training step's outputs for a modest network.
    """
    memory = memory_bytes()
    return DEFAULT_CAP if memory is None else min(DEFAULT_CAP, memory // 8)


def parse_bytes(text: str) -> int:
    """Parse ``FASTBN_POOL_BYTES``: an integer, optionally with a K, M or G suffix (powers of 1024).

    Raises
    ------
    ValueError
        If ``text`` is not such a number, or is negative.
    """
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
            break
    value = int(float(text) * scale) if text.replace(".", "", 1).isdigit() else None
    if value is None or value < 0:
        raise ValueError(f"not a byte count: {text!r}")
    return value


def cap_from_environment() -> int:
    """The cap from ``FASTBN_POOL_BYTES``, or :func:`default_cap` (with a warning if it is malformed)."""
    text = os.environ.get(ENV_VAR)
    if text is None or not text.strip():
        return default_cap()
    try:
        return parse_bytes(text)
    except ValueError:
        warnings.warn(
            f"fastbn: ignoring {ENV_VAR}={text!r} (not a byte count); using the default cap",
            RuntimeWarning,
            stacklevel=2,
        )
        return default_cap()


# ----------------------------------------------------------- mappings ---
class _Block:
    """One pool mapping: ``size`` usable bytes at ``offset`` into ``mapping``."""

    __slots__ = ("address", "mapping", "offset", "size")

    def __init__(self, size: int) -> None:
        mapping = mmap.mmap(-1, size, flags=_MAP_FLAGS)
        address = _address(mapping)
        offset = -address % GRANULE
        if offset:
            # Linux aligns mappings whose length is a multiple of 2 MiB on
            # recent kernels; elsewhere map a little more and start aligned.
            mapping.close()
            mapping = mmap.mmap(-1, size + GRANULE, flags=_MAP_FLAGS)
            address = _address(mapping)
            offset = -address % GRANULE
        if _HUGEPAGE is not None:
            with contextlib.suppress(OSError):  # no transparent huge pages in this kernel
                mapping.madvise(_HUGEPAGE, offset, size)
        self.mapping, self.offset, self.size, self.address = mapping, offset, size, address + offset


def _address(mapping: mmap.mmap) -> int:
    """Start address of an mmap object, without keeping a buffer export on it."""
    probe = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


class _Ref(weakref.ref["ctypes.Array[ctypes.c_char]"]):
    """Weak reference to a handed-out ctypes buffer, remembering its block."""

    __slots__ = ("block",)
    block: _Block


class Pool:
    """A cache of page-aligned anonymous mappings for large arrays.

    Parameters
    ----------
    cap : int
        Most bytes kept in free (cached) blocks; 0 disables the pool, so that
        :meth:`empty` is ``np.empty``.

    Notes
    -----
    fastbn uses one module-level pool, :data:`POOL`; separate instances exist
    for tests.  See the module docstring for the design.
    """

    def __init__(self, cap: int) -> None:
        self.cap = int(cap)
        self._lock = threading.RLock()
        self._reset()
        self._live: dict[int, _Ref] = {}  # id(_Ref) -> _Ref, for handed-out blocks
        self.hits = self.misses = 0
        _POOLS.add(self)

    def _reset(self) -> None:
        """Empty the free structures (under the lock, or in a fresh fork child)."""
        self._by_size: list[tuple[int, int, _Block]] = []  # sorted (size, stamp, block)
        self._lru: dict[int, tuple[int, _Block]] = {}  # stamp -> (size, block), oldest returned first
        self._free_bytes = 0
        self._returned: collections.deque[_Block] = collections.deque()  # blocks back from the dead, not yet filed
        self._clock = itertools.count()

    # ------------------------------------------------------------ public
    def empty(self, shape: SupportsIndex | Iterable[SupportsIndex], dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
        """An uninitialised C-contiguous array, from the pool if it is large enough.

        Parameters
        ----------
        shape : int or tuple of int
        dtype : data-type, default float

        Returns
        -------
        numpy.ndarray
            Writable and C-contiguous, like ``np.empty(shape, dtype)``.  Arrays
            of :data:`THRESHOLD` bytes or more live in a pool mapping that
            returns to the pool when the array and every view of it are gone,
            and then serves a later array with its pages already mapped, so
            that array's first write does not page-fault.
        """
        return self.allocate(shape, dtype)[0]

    def allocate(
        self, shape: SupportsIndex | Iterable[SupportsIndex], dtype: npt.DTypeLike = float
    ) -> tuple[npt.NDArray[Any], bool]:
        """:meth:`empty`, and whether the memory is freshly mapped.

        Returns
        -------
        array : numpy.ndarray
            As :meth:`empty` returns it.
        fresh : bool
            True when the OS has yet to page the memory in (and zero it) on
            first write: a new pool mapping, or a plain ``np.empty`` of
            :data:`FRESH_BYTES` or more while the pool is off (glibc maps
            large blocks anew).  False for a recycled block and for small
            arrays, which come from the heap and mostly reuse memory.  The
            CPU plan writes a fresh output in memory order (see
            :func:`fastbn.backends.cpu.plan.choose`).
        """
        dtype = np.dtype(dtype)
        dims: tuple[int, ...]
        try:
            dims = tuple(map(operator.index, cast("Iterable[SupportsIndex]", shape)))
        except TypeError:
            dims = (operator.index(cast(SupportsIndex, shape)),)
        shape = dims
        nbytes = math.prod(dims) * dtype.itemsize
        # RLock._is_owned exists at run time but is not in typeshed.
        if self.cap <= 0 or nbytes < THRESHOLD or dtype.hasobject or self._lock._is_owned():  # type: ignore[attr-defined]
            # (The last: called from a finalizer that ran inside this thread's locked code.)
            return np.empty(shape, dtype), nbytes >= FRESH_BYTES
        size = -(-nbytes // GRANULE) * GRANULE
        with self._lock:
            evicted = self._file_returned()
            block = self._take(size)
        evicted.clear()  # unmapping happens here, outside the lock
        self._settle()
        fresh = block is None
        if block is None:
            try:
                block = _Block(size)
            except OSError:
                # No address space or mappings left (ENOMEM): give back what
                # the pool holds and let NumPy try, or raise its MemoryError.
                self.empty_cache()
                return np.empty(shape, dtype), True
        buffer = (ctypes.c_char * block.size).from_buffer(block.mapping, block.offset)
        ref = _Ref(buffer, self._on_death)
        ref.block = block
        self._live[id(ref)] = ref
        # A ctypes array exports the buffer protocol, which NumPy's stubs do not list.
        return np.ndarray(shape, dtype, buffer=cast(Any, buffer)), fresh

    def empty_cache(self) -> int:
        """Unmap every free block; returns the bytes released (live arrays are untouched)."""
        self._reap()
        with self._lock:
            evicted = self._file_returned()
            evicted += [block for _, _, block in self._by_size]
            released = self._free_bytes
            self._by_size, self._lru, self._free_bytes = [], {}, 0
        evicted.clear()  # the last references: unmapping happens here, outside the lock
        self._settle()
        return released

    def stats(self) -> dict[str, int]:
        """Counters: free bytes and blocks, live blocks, hits and misses (for tests and tuning)."""
        self._reap()
        with self._lock:
            evicted = self._file_returned()
            result = {
                "cap": self.cap,
                "free_bytes": self._free_bytes,
                "free_blocks": len(self._by_size),
                "live_blocks": len(self._live),
                "hits": self.hits,
                "misses": self.misses,
            }
        evicted.clear()
        self._settle()
        return result

    # ----------------------------------------------------------- private
    def _take(self, size: int) -> _Block | None:
        """Remove and return the best free block for ``size`` bytes, or None (lock held)."""
        try:
            index = bisect.bisect_left(self._by_size, (size,))
            if index == len(self._by_size) or self._by_size[index][0] > MAX_WASTE * size:
                self.misses += 1
                return None
            # Among blocks of the best size, the most recently returned.
            best = self._by_size[index][0]
            index = bisect.bisect_left(self._by_size, (best + 1,)) - 1
            _, stamp, block = self._by_size.pop(index)
            del self._lru[stamp]  # the block is taken from here on
            self._free_bytes -= block.size
            self.hits += 1
            return block
        except BaseException:
            self._repair()
            raise

    def _file_returned(self) -> list[_Block]:
        """File queued blocks as free; remove and return those beyond the cap (lock held).

        The caller drops the returned blocks after releasing the lock; each
        mapping is unmapped when its last reference goes, which is after the
        last buffer export of it (a dying array's ctypes object) is released.
        """
        evicted: list[_Block] = []
        try:
            while self._returned:
                block = self._returned.popleft()
                stamp = next(self._clock)
                bisect.insort(self._by_size, (block.size, stamp, block))
                self._lru[stamp] = (block.size, block)  # the block is free from here on
                self._free_bytes += block.size
            while self._free_bytes > self.cap and self._lru:
                stamp = next(iter(self._lru))
                size, block = self._lru.pop(stamp)  # evicted from here on
                del self._by_size[bisect.bisect_left(self._by_size, (size, stamp))]
                self._free_bytes -= size
                evicted.append(block)
        except BaseException:
            self._repair()
            raise
        return evicted

    def _repair(self) -> None:
        """Rebuild the size index and the byte count from the LRU map (lock held).

        Called when an exception (a signal handler's) interrupted a change of
        the free structures part-way; the LRU map changes in single steps,
        so it is the record of which blocks are free.
        """
        self._by_size = sorted((size, stamp, block) for stamp, (size, block) in self._lru.items())
        self._free_bytes = sum(size for size, _, _ in self._by_size)

    def _reap(self) -> None:
        """Queue the blocks of dead arrays whose weak-reference callback was cut short (by a signal handler)."""
        for key, ref in list(self._live.items()):
            if ref() is None and self._live.pop(key, None) is not None:
                self._returned.append(ref.block)

    def _settle(self) -> None:
        """File queued blocks if nobody holds the lock (whoever holds it files them)."""
        while self._returned:
            # a block died inside this thread's own locked code
            # RLock._is_owned exists at run time but is not in typeshed.
            if self._lock._is_owned():  # type: ignore[attr-defined]
                return
            try:
                if not self._lock.acquire(blocking=False):
                    return
                try:
                    evicted = self._file_returned()
                finally:
                    self._lock.release()
            except BaseException:
                # A signal handler may raise right after acquire() returns,
                # before the try: the lock was free above, so if this thread
                # holds it now, it took it here.
                # RLock._is_owned exists at run time but is not in typeshed.
                if self._lock._is_owned():  # type: ignore[attr-defined]
                    self._lock.release()
                raise
            evicted.clear()  # unmapping happens here, outside the lock

    def _on_death(self, ref: _Ref, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        """Weak-reference callback: the ctypes buffer, hence every array on it, is gone.

        At interpreter exit, arrays die after the module globals this code uses (``bisect``) may have
        been cleared; nothing needs filing then (``_finalizing`` is bound early for that reason).
        """
        if _finalizing() or self._live.pop(id(ref), None) is None:
            return
        self._returned.append(ref.block)
        self._settle()

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_parent(self) -> None:
        self._lock.release()

    def _after_fork_child(self) -> None:
        # The parent's free blocks are copy-on-write copies here: drop them
        # (unmapping them in this process only), and start with a new lock.
        self._lock = threading.RLock()
        self._reset()
        # Arrays that died with the parent's other threads (whose frames the child frees) were the
        # parent's, as its free blocks are: drop their blocks too, rather than let stats() or the next
        # call file them (their weak-reference callbacks did not run to the end in the fork).
        for key, ref in list(self._live.items()):
            if ref() is None:
                self._live.pop(key, None)


_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _before_fork() -> None:
    for pool in list(_POOLS):
        pool._before_fork()


def _after_fork_parent() -> None:
    for pool in list(_POOLS):
        pool._after_fork_parent()


def _after_fork_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)

#: The pool behind :func:`empty`; its cap comes from ``FASTBN_POOL_BYTES``.
POOL = Pool(cap_from_environment() if _MAP_FLAGS and hasattr(mmap.mmap, "madvise") else 0)


def empty(shape: SupportsIndex | Iterable[SupportsIndex], dtype: npt.DTypeLike = float) -> npt.NDArray[Any]:
    """``np.empty(shape, dtype)``, with large arrays' memory recycled: :meth:`Pool.empty` on :data:`POOL`."""
    return POOL.empty(shape, dtype)


def allocate(
    shape: SupportsIndex | Iterable[SupportsIndex], dtype: npt.DTypeLike = float
) -> tuple[npt.NDArray[Any], bool]:
    """:meth:`Pool.allocate` on :data:`POOL`: an output array and whether its memory is freshly mapped."""
    return POOL.allocate(shape, dtype)


def expected_fresh(nbytes: int, recycled: bool) -> bool:
    """Whether :func:`allocate` would hand out fresh memory for ``nbytes``, on a first or a recycled call.

    ``recycled`` means a same-sized output of an earlier call has died, so
    the pool holds its block (as in a training loop's steady state).  This is
    :meth:`Pool.allocate`'s rule, stated for ``python -m fastbn plan``.
    """
    if POOL.cap > 0 and nbytes >= THRESHOLD:
        return not recycled
    return nbytes >= FRESH_BYTES


def empty_cache() -> int:
    """Release the memory that fastbn keeps cached for future outputs.

    fastbn recycles the memory of large outputs (1 MiB or more) once they are
    no longer referenced, instead of returning it to the operating system,
    because paging in fresh memory costs about as much as a batch norm over
    it.  Up to ``FASTBN_POOL_BYTES`` of such free memory is kept (by default
    ``min(1 GiB, RAM / 8)``).  Call this to hand it all back, for example
    after training, before a memory-hungry phase.  Arrays still in use are
    not affected, and later calls simply map new memory.

    Returns
    -------
    int
        The number of bytes unmapped.

    Examples
    --------
    >>> fastbn.empty_cache() >= 0
    True
    """
    return POOL.empty_cache()
