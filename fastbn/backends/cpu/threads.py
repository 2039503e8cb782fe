"""Choose and start Numba's threading layer so fastbn is thread-safe and fork-safe.

Numba's parallel kernels run on one of three threading layers, and with a
plain ``pip install`` none of the defaults is safe for a library:

* ``omp`` (GNU OpenMP) kills a child process forked after the parent ran a
  parallel region ("fork() called from a process already using GNU OpenMP").
  That breaks ``multiprocessing`` with 'fork', PyTorch DataLoader workers and
  pre-fork servers.
* ``workqueue`` aborts the process when two Python threads launch parallel
  kernels at once.
* ``tbb`` is thread-safe, and fork-safe when no other thread is inside a
  kernel at the fork (which fastbn ensures, below), but PyPI's ``tbb`` wheel puts
  ``libtbb.so.12`` in the environment's ``lib/`` directory, which is not on the
  dynamic loader's path, so Numba silently falls back to ``omp``.

fastbn therefore loads libtbb itself (with ``RTLD_GLOBAL``, so Numba's
``tbbpool`` extension resolves against it) and asks Numba for the ``tbb``
layer before any parallel kernel has run.  When TBB cannot be loaded, it uses
``workqueue`` (fork-safe) and serialises kernel launches with a lock (which
makes it thread-safe).  A layer the user chose explicitly with
``NUMBA_THREADING_LAYER``, or one some other library already started, is
respected; fastbn then adds the lock if that layer is ``workqueue``, and
warns (once, when it first needs threads) if another library's parallel code
already started ``omp`` without anyone choosing it, since a fork after that
kills the child.

On every layer a fork waits for the kernels running in other threads and
holds back new ones until it is done (see "launches and fork" below): TBB
forked in the middle of another thread's kernel can leave the child hanging.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
import weakref

__all__ = ["configure", "kernel_guard", "set_thread_count", "thread_count", "threading_layer"]

_LIBTBB_NAMES = {
    "linux": "libtbb.so.12",
    "darwin": "libtbb.12.dylib",
    "win32": "tbb12.dll",
}

_state_lock = threading.Lock()
_layer: str | None = None
# Held around every kernel launch when the active layer is not thread-safe.
# Reentrant (as are the locks below) so that a fork from a signal handler
# that runs in a thread between its kernel's return and the end of its
# launch does not wait for that thread itself.
_launch_lock = threading.RLock()
_needs_lock = False


# ------------------------------------------------------- launches and fork ---
# Numba's TBB layer shuts TBB's workers down before fork() only when no other
# thread is using TBB at that moment; a fork taken while another thread runs
# a parallel kernel leaves the child a TBB whose internal locks may be held by
# threads that do not exist there, and the child's first kernel can hang
# forever (typically 2-8% of forks, once 17%, with 2-6 threads launching
# small kernels; none in 1000 forks since).  So
# every launch holds its own thread's launch lock, and a fork (``os.fork``,
# ``multiprocessing``'s 'fork') first takes all of them: it waits for the
# kernels running in other threads to finish, and no kernel starts until it
# is done.  A per-thread lock keeps launches from different threads
# concurrent; ``with`` on a lock is safe against a signal handler's exception
# (the lock is taken and released in C), which a counter would not be.


class _LaunchSlot:
    """One thread's launch lock; the registry below holds it weakly, so it goes with its thread."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()


_slots: weakref.WeakSet[_LaunchSlot] = weakref.WeakSet()  # every live thread's slot, guarded by _slots_lock
_slots_lock = threading.RLock()
_this_thread = threading.local()
_taken_for_fork: list[threading.RLock] = []


def _thread_launch_lock() -> threading.RLock:
    """The calling thread's launch lock, made and registered on its first launch."""
    try:
        existing: _LaunchSlot = _this_thread.slot
        return existing.lock
    except AttributeError:
        pass
    slot = _LaunchSlot()
    with _slots_lock:  # never while a fork holds the registry
        _slots.add(slot)
    _this_thread.slot = slot
    return slot.lock


def _before_fork() -> None:
    # Each lock is recorded before it is taken, and released after the fork
    # only if this thread holds it, so that an exception from a signal handler
    # part-way through (which os.fork reports and ignores) leaves none held.
    _taken_for_fork.append(_slots_lock)
    _slots_lock.acquire()
    for lock in [_launch_lock, *(slot.lock for slot in list(_slots))]:
        _taken_for_fork.append(lock)
        lock.acquire()


def _after_fork_in_parent() -> None:
    while _taken_for_fork:
        lock = _taken_for_fork.pop()
        # RLock._is_owned exists at run time (C and Python RLock) but is not in typeshed.
        if lock._is_owned():  # type: ignore[attr-defined]
            lock.release()


def _after_fork_in_child() -> None:
    # The child has only the forking thread: fresh locks and registry (the
    # copies are held by the fork, and by threads that do not exist here).
    global _launch_lock, _slots, _slots_lock, _this_thread
    _taken_for_fork.clear()
    _launch_lock = threading.RLock()
    _slots = weakref.WeakSet()
    _slots_lock = threading.RLock()
    _this_thread = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def _libtbb_candidates() -> list[str]:
    """Paths where a pip- or conda-installed libtbb may live, best first."""
    name = _LIBTBB_NAMES.get(sys.platform)
    if name is None:
        return []
    candidates = []
    try:
        from importlib import metadata

        for entry in metadata.files("tbb") or ():
            if entry.name == name:
                candidates.append(str(entry.locate()))
    except Exception:  # no tbb distribution, or unreadable metadata
        pass
    libdir = "Library/bin" if sys.platform == "win32" else "lib"
    for prefix in (sys.prefix, sys.base_prefix):
        candidates.append(os.path.join(prefix, libdir, name))
    return candidates


def _preload_libtbb() -> bool:
    """Load libtbb globally so Numba's tbbpool extension links against it."""
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    for path in _libtbb_candidates():
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=mode)
                return True
            except OSError:
                continue
    # Maybe it is already on the loader's path (system TBB).
    name = _LIBTBB_NAMES.get(sys.platform)
    if name:
        try:
            ctypes.CDLL(name, mode=mode)
            return True
        except OSError:
            pass
    return False


def configure() -> str:
    """Start Numba's parallel backend with a thread- and fork-safe layer.

    Idempotent and thread-safe; called before the first kernel launch.

    Returns
    -------
    str
        The name of the threading layer in use: ``"tbb"``, ``"omp"`` or
        ``"workqueue"``.
    """
    global _layer, _needs_lock
    if _layer is not None:
        return _layer
    with _state_lock:
        if _layer is not None:
            return _layer
        import numba
        from numba.np.ufunc import parallel

        started_elsewhere = parallel._is_initialized
        if not started_elsewhere:
            have_tbb = _preload_libtbb()
            user_choice = os.environ.get("NUMBA_THREADING_LAYER")
            if numba.config.THREADING_LAYER == "default" and not user_choice:
                numba.config.THREADING_LAYER = "tbb" if have_tbb else "workqueue"
            try:
                parallel._launch_threads()
            except ValueError:
                # libtbb loaded but Numba rejected it (version too old): the
                # fork-safe layer plus our lock is the safe fallback.
                if user_choice:
                    raise
                numba.config.THREADING_LAYER = "workqueue"
                parallel._launch_threads()
        layer: str = numba.threading_layer()
        chosen = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER not in ("default",)
        if started_elsewhere and layer == "omp" and not chosen:
            # Numba starts its layer once per process: it cannot be replaced now.
            warnings.warn(
                "fastbn: Numba's threading layer was already started as 'omp' (GNU OpenMP) by other parallel "
                "code before fastbn's first kernel; a process forked after a parallel kernel has run will be "
                "killed. Call fastbn.threading_layer() before any other Numba parallel code (fastbn then starts "
                "the fork-safe 'tbb' layer), or set NUMBA_THREADING_LAYER=tbb.",
                RuntimeWarning,
                stacklevel=3,
            )
        _needs_lock = layer == "workqueue"
        _layer = layer
        return layer


def threading_layer() -> str:
    """Return the Numba threading layer fastbn runs on, starting it if needed.

    Returns
    -------
    str
        ``"tbb"`` after a normal install; ``"workqueue"`` (with launches
        serialised by a lock) when TBB could not be loaded; whatever the user
        forced through ``NUMBA_THREADING_LAYER`` otherwise.

    Examples
    --------
    >>> fastbn.threading_layer() in ("tbb", "workqueue", "omp")
    True
    """
    return configure()


# ------------------------------------------------------- the thread count ---
# numba.get_num_threads() and numba.set_num_threads() run Numba's start-up
# check at every call, under Numba's start-up locks, one of them a
# multiprocessing lock whose ``__enter__`` is Python code: a signal handler's
# exception (KeyboardInterrupt, an alarm's) raised just after the lock was
# taken leaves it held by the interrupted thread for good, and the next
# thread that asks Numba for its thread count waits forever (seen: a thread
# started after a few hundred interrupted calls hung).  Once the layer runs,
# the thread count is one call into it, which is what these two make.


def thread_count() -> int:
    """Numba's thread count for the calling thread (``numba.get_num_threads()``), without Numba's locks.

    Starts fastbn's threading layer first (:func:`configure`): asking Numba
    before would start its default one.
    """
    configure()
    from numba.np.ufunc import parallel

    return int(parallel._get_num_threads())


def set_thread_count(count: int) -> None:
    """Set Numba's thread count for the calling thread (``numba.set_num_threads``), without Numba's locks.

    ``count`` must lie in ``[1, numba.config.NUMBA_NUM_THREADS]``; fastbn
    sets 1, or restores what :func:`thread_count` returned.
    """
    configure()
    from numba.np.ufunc import parallel

    parallel._set_num_threads(count)


def kernel_guard() -> threading.RLock:
    """Context manager to hold around a kernel launch (use it with ``with``).

    On ``workqueue`` it serialises launches; on every layer it keeps a fork
    from being taken while the kernel runs (see "launches and fork" above).
    """
    configure()
    if _needs_lock:
        return _launch_lock
    return _thread_launch_lock()
