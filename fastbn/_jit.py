"""The one place that decides how fastbn's CPU kernels are compiled.

Imported only by :mod:`fastbn._cpu`, which is itself imported on the first
kernel call, so ``import fastbn`` neither imports Numba nor compiles anything.
"""

from __future__ import annotations

import numba

# Why these flags: 'reassoc' lets LLVM split a float accumulation into vector
# lanes (the reductions are memory-bound only once vectorised); 'contract'
# allows FMA; 'nsz' ignores the sign of zero.  Never 'nnan'/'ninf': they let
# LLVM assume no NaN/Inf, which would break PyTorch's NaN propagation.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})


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
        return numba.njit(cache=True, **options)(func)
    except RuntimeError:
        # Numba raises RuntimeError("cannot cache function ...: no locator
        # available") when no cache directory is writable.
        return numba.njit(cache=False, **options)(func)


def inline(func):
    """Compile a small helper that kernels call; inlined into them by LLVM."""
    return numba.njit(fastmath=set(FASTMATH), inline="always")(func)
