"""The CUDA backend: Numba CUDA kernels on GPU arrays, with the CPU backend's file names.

``ops`` (the :class:`~fastbn.backends.Backend`), ``plan`` (launch sizes,
grids and the launches), ``numerics`` (Welford, Chan's merge and the
per-channel kernels), ``reductions``, ``elementwise``, ``views`` (GPU arrays
in and out), and ``target``, the one module that imports numba.cuda.
Nothing is imported here: :func:`fastbn.backends.load` imports ``ops``.
"""
