"""A stream-ordered cache of device allocations, for calls whose arrays no framework allocates.

PyTorch and CuPy callers get their outputs and workspaces from their own
framework's caching allocator (:mod:`fastbn.backends.cuda.context`).  For
Numba's device arrays, and any other CUDA Array Interface exporter, fastbn
keeps this pool instead, so that a steady-state training loop makes no
``cuMemAlloc`` and no ``cuMemFree``: both are slow, the second synchronises
the device (Numba defers its frees and then synchronises when it flushes
them), and neither is allowed while a CUDA graph is being captured.

The rule is the caching allocators' one.  A block is handed out for work on
one stream; when its last user (the array over it) is garbage-collected it
goes back to that stream's free list, and only work on the *same* stream
takes it again.  Stream order then guarantees that any kernel still using
the block in its old life runs before the kernels of its new one, with no
synchronisation at all.  (An output that the caller hands to work on another
stream must be kept alive until that work is done, as with PyTorch's
allocator; fastbn's own calls never do that.)

Sizes are rounded up to a power of two of at least :data:`MIN_BLOCK` bytes,
so a block serves every request between half its size and its size.  This
module is pure Python: the raw allocation is a function given to
:class:`StreamOrderedPool`, which the tests replace with a fake one.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["MIN_BLOCK", "StreamOrderedPool", "size_class"]

#: Smallest block, in bytes: the per-channel arrays of a call are small and many.
MIN_BLOCK = 512


def size_class(nbytes: int) -> int:
    """The block size that serves a request of ``nbytes``: the next power of two, at least MIN_BLOCK."""
    if nbytes < 0:
        raise ValueError(f"nbytes: expected a non-negative size, got {nbytes}")
    return max(MIN_BLOCK, 1 << max(0, (nbytes - 1).bit_length()))


class StreamOrderedPool:
    """Free lists of device blocks, per stream and size class.

    Parameters
    ----------
    raw_allocate : callable
        ``raw_allocate(nbytes)`` returns a new device allocation of ``nbytes``
        bytes (an object the pool keeps alive while the block is cached).
        It may raise on out-of-memory; the pool then releases every cached
        block and tries once more.

    Attributes
    ----------
    allocations : int
        How many times ``raw_allocate`` was called: a steady-state loop
        leaves it unchanged (the tests check that).
    """

    def __init__(self, raw_allocate: Callable[[int], Any]) -> None:
        self._raw_allocate = raw_allocate
        self._free: defaultdict[tuple[Hashable, int], list[Any]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocations = 0

    def acquire(self, nbytes: int, stream: Hashable) -> tuple[Any, int, Callable[[], None]]:
        """A block of at least ``nbytes`` bytes for work on ``stream``.

        Returns
        -------
        block, size, release
            The raw allocation, its size in bytes, and the function that
            returns it to ``stream``'s free list: call it (or let
            :meth:`release_when_collected` call it) once nothing will use
            the block any more, other than work already queued on ``stream``.
        """
        size = size_class(nbytes)
        key = (stream, size)
        with self._lock:
            free = self._free[key]
            block = free.pop() if free else None
        if block is None:
            block = self._allocate(size)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            with self._lock:
                self._free[key].append(block)

        return block, size, release

    def release_when_collected(self, owner: object, release: Callable[[], None]) -> None:
        """Return a block to its free list when ``owner`` (the array over it) is garbage-collected."""
        weakref.finalize(owner, release)

    def cached_bytes(self) -> int:
        """The bytes held in free lists (not in use by any array)."""
        with self._lock:
            return sum(size * len(blocks) for (_, size), blocks in self._free.items())

    def empty(self) -> None:
        """Drop every cached block (the raw allocations are freed when nothing else holds them)."""
        with self._lock:
            self._free.clear()

    def _allocate(self, size: int) -> Any:
        try:
            block = self._raw_allocate(size)
        except Exception:
            # Out of memory, most likely: give the cached blocks back to the
            # device and try once more; a second failure is the caller's.
            self.empty()
            block = self._raw_allocate(size)
        self.allocations += 1
        return block
