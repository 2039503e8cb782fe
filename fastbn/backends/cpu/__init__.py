"""The CPU backend: Numba ``@njit(parallel=True)`` kernels on NumPy views of the caller's memory.

``ops.py`` (the :class:`~fastbn.backends.Backend`), ``plan.py`` (how a
call's work is split, in plain Python), ``numerics.py`` (Chan's merge, the
coefficients), ``reductions.py``, ``elementwise.py`` and ``fused.py`` (the
kernels), ``loops.py`` (their inner loops), ``views.py`` (arrays in and
out), and what serves them: ``alloc.py`` (the output pool), ``threads.py``
(the threading layer), ``nontemporal.py`` (stores around the cache),
``jit.py`` (compile flags) and ``machine.py`` (cache sizes).  Importing this
package imports nothing; the kernel modules import Numba.
"""
