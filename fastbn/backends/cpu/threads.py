"""Choose and start Numba's threading layer so fastbn is thread-safe and fork-safe.

Numba's parallel kernels run on one of three threading layers, and with a
plain ``pip install`` none of the defaults is safe for a library:

* ``omp`` (GNU OpenMP) kills a child process forked after the parent ran a
  parallel region ("fork() called from a process already using GNU OpenMP").
  That breaks ``multiprocessing`` with 'fork', PyTorch DataLoader workers and
  pre-fork servers.
* ``workqueue`` aborts the process when two Python threads launch parallel
  kernels at once.
* ``tbb`` is both thread-safe and fork-safe, but PyPI's ``tbb`` wheel puts
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
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import warnings

__all__ = ["configure", "kernel_guard", "threading_layer"]

_LIBTBB_NAMES = {
    "linux": "libtbb.so.12",
    "darwin": "libtbb.12.dylib",
    "win32": "tbb12.dll",
}

_state_lock = threading.Lock()
_layer: str | None = None
# Held around every kernel launch when the active layer is not thread-safe.
_launch_lock = threading.Lock()
_needs_lock = False


def _reset_lock_in_child() -> None:
    # A fork taken while another thread held the lock would leave the child's
    # copy locked forever; the child has only one thread, so a new lock is right.
    global _launch_lock
    _launch_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


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
    except Exception:  # noqa: BLE001 - no tbb distribution, or unreadable metadata
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
        layer = numba.threading_layer()
        chosen = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER not in ("default",)
        if started_elsewhere and layer == "omp" and not chosen:
            # Numba starts its layer once per process: it cannot be replaced now.
            warnings.warn(
                "fastbn: Numba's threading layer was already started as 'omp' (GNU OpenMP) by other parallel "
                "code before fastbn's first kernel; a process forked after a parallel kernel has run will be "
                "killed. Call fastbn.threading_layer() before any other Numba parallel code (fastbn then starts "
                "the fork-safe 'tbb' layer), or set NUMBA_THREADING_LAYER=tbb.",
                RuntimeWarning, stacklevel=3)
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
    """
    return configure()


def kernel_guard():
    """Context manager to hold around a kernel launch.

    A no-op on thread-safe layers; serialises launches on ``workqueue``.
    """
    configure()
    if _needs_lock:
        return _launch_lock
    return contextlib.nullcontext()
