"""The backend interface: what a backend provides, under the same names on CPU and CUDA.

:mod:`fastbn._api` validates every argument, then calls one backend through
this interface and nothing else.  A backend is a subpackage with the same
file names as the other:

==================  ===========================================================
``ops.py``          the backend's class implementing :class:`Backend`
``plan.py``         how work is split: the CPU plan, the CUDA launch shapes
``numerics.py``     Chan's merge and the per-channel coefficients, once each
``reductions.py``   statistics and gradient-sum kernels
``elementwise.py``  normalization and dx kernels
``views.py``        how a caller's array becomes a kernel input and an output
==================  ===========================================================

plus what only one of them needs (the CPU's allocator, threading layer,
non-temporal stores and compile flags; the CUDA target module).

Every method receives arguments already validated by :mod:`fastbn._api`, in
the backend's own array kind (NumPy arrays on the CPU, device arrays on
CUDA): ``dtype`` is the statistics dtype (float32 for float16/bfloat16/float32
input, float64 for float64; only the CPU backend takes bfloat16), ``axis`` is
non-negative, per-channel arrays have shape ``(C,)``.  Per-channel sums that cross processes (the synchronised
path, :mod:`fastbn._sync`) are float64 NumPy vectors on the host.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Protocol

__all__ = ["BACKENDS", "Backend", "SyncPieces", "load"]

#: The backends' names, as ``backend=`` takes them.
BACKENDS = ("cpu", "cuda")


class SyncPieces(Protocol):
    """The pieces of synchronised batch norm (:mod:`fastbn._sync`): the operations, split where the
    per-channel sums cross processes.  A process may hold no elements at all, so each piece accepts an
    empty x."""

    def local_moments(self, x: Any, axis: int) -> tuple[Any, Any]:
        """This process's float64 host ``(mean, biased var)``; zeros for an empty x."""

    def normalize_with_stats(
        self, x: Any, axis: int, dtype: Any, mean64: Any, var64: Any, weight: Any, bias: Any, eps: float
    ) -> tuple[Any, Any, Any]:
        """Normalise with given float64 statistics: ``(y, mean, invstd)`` in ``dtype``."""

    def update_running(
        self, running_mean: Any, running_var: Any, mean64: Any, var64: Any, momentum: float, count: int
    ) -> None:
        """PyTorch's running-statistics update, in place, over ``count`` elements per channel."""

    def backward_sums(self, dy: Any, x: Any, axis: int, mean: Any) -> tuple[Any, Any]:
        """This process's float64 host ``(sum_dy, dotp)``; zeros for an empty x."""

    def backward_dx(
        self,
        dy: Any,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        sum_dy64: Any,
        dotp64: Any,
        count: int,
    ) -> Any:
        """The training-formula dx from per-channel sums over ``count`` elements."""


def _without_weights(backend: object) -> NoReturn:
    """What a backend without weighted kernels does when asked for them (never reached from the public API)."""
    raise NotImplementedError(f"{type(backend).__name__}: sample weights and masks run on the CPU backend only")


class Backend(Protocol):
    """The operations every backend implements.

    ``plan`` is a private override of the backend's plan, for tests: a
    mapping of plan fields to force (see :func:`fastbn.backends.cpu.plan.choose`);
    None lets the backend choose.  Only the CPU backend has plans to force.
    """

    #: ``"cpu"`` or ``"cuda"``.
    name: str
    #: The synchronised pieces, or None where the backend has none yet (then
    #: ``process_group`` is refused before any kernel runs).
    sync: SyncPieces | None

    # -- the caller's arrays -------------------------------------------------
    def for_call(self, arrays: Sequence[tuple[str, Any]]) -> Backend:
        """This backend bound to one call on ``arrays`` (the input first): where its work runs.

        The CPU backend is itself.  The CUDA backend returns one whose every
        operation runs on the input's device and its framework's current
        stream, with its framework's allocator
        (:mod:`fastbn.backends.cuda.context`).
        """

    def to_backend(self, obj: Any, name: str, *, read_only: bool = False) -> Any:
        """``obj`` as this backend's array, without a copy (None stays None); errors name ``name``.

        ``read_only``: the call only reads ``obj``, even if it is a running
        statistic, so a converted copy loses nothing.
        """

    def restorer(self, like: Any) -> Callable[[Any], Any]:
        """A function turning this backend's results into the kind of array ``like`` is."""

    def from_host(self, array: Any) -> Any:
        """The host array ``array`` where this backend computes: itself on the CPU, a device copy on CUDA."""

    # -- the public operations -----------------------------------------------
    def forward_batch(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        momentum: float,
        update: bool,
        *,
        relu: bool = False,
        residual: Any = None,
        renorm: tuple[float, float] | None = None,
        groups: int = 1,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any, Any, Any]:
        """Normalise with batch statistics, update the running ones if ``update``: ``(y, mean, invstd, r, d)``."""

    def forward_eval(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        *,
        relu: bool = False,
        residual: Any = None,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        """Normalise with the running statistics: ``(y, mean, invstd)``."""

    def normalize(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        mean: Any,
        var: Any,
        weight: Any,
        bias: Any,
        eps: float,
        *,
        plan: Mapping[str, Any] | None = None,
    ) -> Any:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel."""

    def moments(self, x: Any, axis: int, dtype: Any, *, plan: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
        """Per-channel mean and biased variance, in ``dtype``."""

    def backward(
        self,
        dy: Any,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        batch_stats: bool,
        *,
        y: Any = None,
        dresidual: bool = False,
        r: Any = None,
        d: Any = None,
        groups: int = 1,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any, Any]:
        """Gradients ``(dx, dweight, dbias, dresidual)``; the training formula if ``batch_stats``."""

    # Weights and masks (CPU only so far: the public functions refuse them on other backends first).
    # A default body, not a trivial one, so they are no abstract members: a backend that subclasses
    # Backend without them (CUDA) inherits these, which raise.
    def weighted_moments(self, x: Any, w: Any, axis: int) -> tuple[Any, Any, Any]:
        """Float64 ``(W, mean, var)`` per channel under weights ``w`` of x's shape."""
        _without_weights(self)

    def weighted_forward(
        self,
        x: Any,
        w: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        momentum: float,
        update: bool,
        *,
        relu: bool,
        residual: Any,
    ) -> tuple[Any, Any, Any, Any]:
        """Normalise everywhere with the weighted statistics: ``(y, mean, invstd, W)``."""
        _without_weights(self)

    def weighted_backward(
        self,
        dy: Any,
        x: Any,
        w: Any,
        wsum: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        *,
        y: Any = None,
        dresidual: bool = False,
    ) -> tuple[Any, Any, Any, Any]:
        """Training-mode gradients under weights ``w``: ``(dx, dweight, dbias, dresidual)``."""
        _without_weights(self)

    def fold(
        self,
        layer_weight: Any,
        layer_bias: Any,
        running_mean: Any,
        running_var: Any,
        weight: Any,
        bias: Any,
        eps: float,
        axis: int,
    ) -> tuple[Any, Any]:
        """Eval-mode batch norm folded into the layer before it: ``(folded_weight, folded_bias)``."""


def load(name: str) -> Backend:
    """The backend called ``name``, importing it on first use.

    Raises
    ------
    ValueError
        If the backend cannot be imported (no CUDA target installed, for the
        CUDA one); the message names ``backend`` and what is missing.
    """
    try:
        module = importlib.import_module(f"fastbn.backends.{name}.ops")
    except ImportError as exc:
        raise ValueError(f"backend: the {name.upper()} backend is not available ({exc})") from None
    backend: Backend = module.BACKEND
    return backend


@functools.cache
def sources_hash(folder: str) -> bytes:
    """SHA-256 of every ``.py`` file in ``folder``, in name order: a backend's kernel-cache stamp.

    Numba drops a cached kernel when the kernel's own file changes, not when a
    helper it inlines from another file of the backend does; both backends
    stamp their caches with this instead (``cpu/jit.py``, ``cuda/target.py``).
    Read once per process and folder.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()
