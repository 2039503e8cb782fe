"""A stateful batch-normalization layer built on :func:`fastbn.forward` and :func:`fastbn.backward`.

:class:`BatchNorm` owns what the functional API leaves to the caller: the
affine parameters, the running statistics and their batch counter, the
train/eval switch, and the tensors that backward needs.  Its semantics and its
``state_dict`` keys are PyTorch's (``torch.nn.BatchNorm1d/2d/3d``), so a
PyTorch checkpoint loads into it and numbers agree.

The layer never computes on the input itself: every array operation goes
through the functional API.  It reads only ``x.shape``, ``x.ndim`` and
``x.dtype``, so it accepts whatever arrays :func:`fastbn.forward` accepts,
GPU arrays included: its parameters and running statistics then move once to
the device (``Backend.from_host``) and stay there.
"""

from __future__ import annotations

import numbers
import operator
import threading
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fastbn import _dispatch
from fastbn._api import Saved
from fastbn._api import backward as _backward
from fastbn._api import forward as _forward
from fastbn._frameworks import framework_of
from fastbn._options import check_eps, check_flag, check_momentum, check_process_group
from fastbn._typing import ArrayT, StateArray, SupportsArray

__all__ = ["BatchNorm"]

# PyTorch's names, in PyTorch's order (``module.state_dict()`` lists
# parameters before buffers).
_PARAM_KEYS = ("weight", "bias")
_STAT_KEYS = ("running_mean", "running_var")
_COUNT_KEY = "num_batches_tracked"


class StateDictKeyError(KeyError, ValueError):
    """A ``state_dict`` with missing or unexpected keys: both a KeyError and a ValueError."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes and escapes); this is a sentence.
        return str(self.args[0]) if self.args else ""


def _check_num_features(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("num_features: expected a positive integer, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"num_features: expected a positive integer, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"num_features: expected a positive integer, got {value}")
    if value > np.iinfo(np.intp).max // 8:  # no array of float64 this long can exist
        raise ValueError("num_features: expected a positive integer, got one larger than any array can hold")
    return int(value)


def _check_axis(value: Any) -> int:
    # The rank of the input is unknown until forward, so only the type is
    # checked here; the range is checked against each input.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("axis: expected an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"axis: expected an integer, got {type(value).__name__}") from None


def _check_dtype(value: Any) -> np.dtype:
    try:
        dtype: np.dtype = np.dtype(value)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {value!r}") from None
    if dtype == np.float16 or dtype.name == "bfloat16":
        # The functional API keeps float32 parameters for half input, so a
        # float16 or bfloat16 layer could never run.
        raise ValueError(
            f"dtype: {dtype.name} parameters are not supported; use dtype=np.float32, "
            "which also takes float16 and bfloat16 input"
        )
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    return dtype


def _to_numpy(value: Any) -> Any:
    """Host NumPy copy of a checkpoint entry: array, torch tensor, device array or number."""
    kind = framework_of(value)
    if kind == "torch":
        tensor = value.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:
            # bfloat16 has no NumPy dtype; float32 holds every bfloat16 exactly.
            return tensor.float().numpy()
    if kind == "numba":
        return value.copy_to_host()
    if kind == "cupy":
        return value.get()
    return np.asarray(value)


def _to_host(array: Any) -> Any:
    """NumPy copy of one of the layer's own arrays, wherever it lives."""
    if isinstance(array, np.ndarray):
        return array.copy()
    return _to_numpy(array).copy()


def _copy_into(dst: Any, src: Any) -> None:
    """Overwrite ``dst`` in place, so references held elsewhere (an optimizer's) stay valid."""
    kind = framework_of(dst)
    if kind == "numpy":
        dst[...] = src
    elif kind == "numba":
        dst.copy_to_device(np.ascontiguousarray(src, dtype=dst.dtype))
    elif kind == "cupy":
        dst.set(np.ascontiguousarray(src, dtype=dst.dtype))
    else:
        raise TypeError(f"cannot copy into an array of type {type(dst).__name__}")


class _Snapshot:
    """Copies of a layer's running statistics and count, to put back if a training call is interrupted.

    Host (NumPy) statistics are copied; others (a GPU backend's device arrays) are not, and an interrupt
    that lands right after their kernel leaves the count one behind, as before.
    """

    __slots__ = ("cache", "count", "mean", "var")

    def __init__(self, layer: BatchNorm) -> None:
        self.count = layer.num_batches_tracked
        self.cache = layer._cache
        self.mean = layer.running_mean.copy() if isinstance(layer.running_mean, np.ndarray) else None
        self.var = layer.running_var.copy() if isinstance(layer.running_var, np.ndarray) else None

    def restore(self, layer: BatchNorm) -> None:
        """Put the statistics, the count and the cached input back as they were.

        Only statistics a kernel could have written are copied back: a read-only or misshapen one (which
        validation refused) is left alone, so the error that refused it is the one raised.
        """
        for array, copy in ((layer.running_mean, self.mean), (layer.running_var, self.var)):
            if copy is not None and array.flags.writeable and array.shape == copy.shape:
                np.copyto(array, copy)
        layer.num_batches_tracked, layer._cache = self.count, self.cache


class BatchNorm:
    """Batch normalization over one channel axis, with PyTorch's semantics.

    In training mode each channel is normalized with the mean and biased
    variance of the batch, and the running statistics are updated; in eval
    mode the running statistics are used instead.  One class covers
    ``torch.nn.BatchNorm1d``, ``2d`` and ``3d``: the channel axis is ``axis``
    and every other axis is reduced over.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``, the length of ``x.shape[axis]``.
    axis : int, default 1
        The channel axis of the inputs (``1`` for ``(N, C)``, ``(N, C, L)``
        and NCHW; ``-1`` for channels-last).  May be negative.
    eps : float, default 1e-5
        Added to the variance before the square root; must be positive.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics, PyTorch's
        convention: ``running = (1 - momentum) * running + momentum * batch``
        (Keras and Flax use ``0.99`` for the opposite weighting).  ``None``
        gives a cumulative average: ``momentum = 1 / num_batches_tracked``,
        after incrementing it, so the running statistics are the plain mean
        of every batch's statistics.
    affine : bool, default True
        Whether to learn a per-channel scale ``weight`` (initialised to 1) and
        shift ``bias`` (initialised to 0).
    track_running_stats : bool, default True
        Whether to keep running statistics.  Without them, batch statistics
        are used in eval mode too, as in PyTorch.
    dtype : numpy dtype, default numpy.float32
        dtype of the parameters and statistics: ``float32`` for float16,
        bfloat16 and float32 input, ``float64`` for float64 input.
    process_group : object, optional
        Synchronise batch statistics over processes (data-parallel training):
        an mpi4py communicator, a torch.distributed process group or a
        :class:`fastbn.Collectives`.  See :func:`fastbn.forward`.

    Attributes
    ----------
    weight, bias : numpy.ndarray or None
        The affine parameters, shape ``(C,)``; None when ``affine=False``.
    running_mean, running_var : numpy.ndarray or None
        Running statistics, shape ``(C,)``, initialised to 0 and 1; None when
        ``track_running_stats=False``.  ``running_var`` holds the *unbiased*
        variance, as PyTorch's does.
    num_batches_tracked : int or None
        Training batches seen since the statistics were reset; None when
        ``track_running_stats=False``.
    grad_weight, grad_bias : numpy.ndarray or None
        Gradients from the last :meth:`backward` (None before it and when
        ``affine=False``).  Each backward overwrites them; they do not
        accumulate as PyTorch's ``.grad`` does.
    training : bool
        True in training mode (the default), False after :meth:`eval`.

    See Also
    --------
    fastbn.forward, fastbn.backward : the functional API this layer calls.

    Notes
    -----
    The layer follows its input: the first GPU input (any
    ``__cuda_array_interface__`` array) moves ``weight``, ``bias`` and the
    running statistics to the device, as Numba device arrays, where they are
    updated in place; a host input moves them back.  To update device
    parameters in an optimizer, wrap them (``cupy.asarray(p)`` is zero-copy).

    ``layer(x)`` keeps a reference to ``x`` (not a copy) for :meth:`backward`;
    do not modify ``x`` in place in between.  :meth:`backward` reads the
    current ``weight``, so call it before an optimizer updates the parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.layer import BatchNorm
    >>> bn = BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 3)).astype(np.float32)
    >>> y = bn(x)
    >>> bool(np.allclose(y.mean(axis=0), 0, atol=1e-5))
    True
    >>> dx = bn.backward(np.ones_like(y))
    >>> [g.shape for g in bn.gradients()]
    [(3,), (3,)]
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: npt.DTypeLike = np.float32,
        process_group: object = None,
    ) -> None:
        self.num_features = _check_num_features(num_features)
        check_process_group(process_group)  # a TypeError now rather than at the first batch
        self.process_group = process_group
        self.axis = _check_axis(axis)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.affine = check_flag(affine, "affine")
        self.track_running_stats = check_flag(track_running_stats, "track_running_stats")
        self.dtype = _check_dtype(dtype)
        self.training = True

        c = self.num_features
        # NumPy arrays; Numba device arrays once a CUDA input has moved them (see _follow).
        self.weight: Any
        self.bias: Any
        self.running_mean: Any
        self.running_var: Any
        self.num_batches_tracked: int | None
        if self.affine:
            self.weight = np.ones(c, dtype=self.dtype)
            self.bias = np.zeros(c, dtype=self.dtype)
        else:
            self.weight = None
            self.bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype=self.dtype)
            self.running_var = np.ones(c, dtype=self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        # (x, saved) of the last forward: what backward needs.
        self._cache: tuple[SupportsArray, Saved] | None = None
        # Held by forward and backward: their state changes (running statistics, the batch counter, the
        # input kept for backward) are one step each, also when threads share the layer.
        self._lock = threading.RLock()

    # ------------------------------------------------------------- modes ---
    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (or to eval mode with ``mode=False``).

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for eval mode.

        Returns
        -------
        BatchNorm
            ``self``, so calls can be chained.
        """
        self.training = check_flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Switch to eval mode: normalize with the running statistics.

        Returns
        -------
        BatchNorm
            ``self``, so calls can be chained.
        """
        return self.train(False)

    # ----------------------------------------------------------- compute ---
    def _check_input(self, x: Any) -> None:
        # Only attributes every array type has (host and device arrays alike):
        # the functional API does the rest of the checking.
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        ndim = len(x.shape)
        if ndim < 2:
            raise ValueError(f"x: expected at least 2 dimensions (batch and channel), got shape {tuple(x.shape)}")
        # The layer's attributes are public, so they are checked here, where they are used: a value
        # assigned after construction is named, before anything is computed or updated.
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise TypeError(f"axis: expected an int, got {type(self.axis).__name__}")
        count = self.num_batches_tracked
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0):
            raise TypeError(f"num_batches_tracked: expected None or a non-negative int, got {count!r}")
        if count is None and self.training and self.track_running_stats and self.momentum is None:
            raise ValueError(
                "num_batches_tracked: None with momentum=None (a cumulative average needs the count); "
                "set num_batches_tracked = 0 or give a momentum"
            )
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis: {self.axis} is out of range for an input of {ndim} dimensions")
        # Checked here because without weight and running statistics the
        # functional API has nothing to compare the channel count with.
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} channels on axis {self.axis}, got shape {tuple(x.shape)}"
            )
        # By name: a torch dtype prints as "torch.float32", and bfloat16 has
        # no NumPy dtype unless ml_dtypes has been imported.
        accepted = ("float64",) if self.dtype == np.float64 else ("float16", "bfloat16", "float32")
        dtype = str(x.dtype).rpartition(".")[2]
        if dtype not in accepted:
            names = "float64" if self.dtype == np.float64 else "float16, bfloat16 or float32"
            raise TypeError(
                f"x: a BatchNorm with dtype {self.dtype} takes {names} input, got {x.dtype}; "
                + (
                    "build the layer with dtype=np.float64 for float64 input"
                    if dtype == "float64"
                    else "convert the input"
                )
            )

    def forward(self, x: ArrayT) -> ArrayT:
        """Normalize ``x`` and keep what :meth:`backward` needs.

        Parameters
        ----------
        x : array
            Input with at least 2 dimensions and ``num_features`` channels
            on ``axis``; float16, bfloat16 or float32 for a float32 layer,
            float64 for a float64 layer.

        Returns
        -------
        y : array
            The normalized output, same shape and dtype as ``x``.

        Raises
        ------
        TypeError
            If ``x`` is not an array or has the wrong dtype for the layer.
        ValueError
            If its shape does not match the layer, or (in training mode) a
            channel has only one value, as in PyTorch.

        Notes
        -----
        In training mode with running statistics, ``num_batches_tracked`` is
        incremented and the statistics are updated, both only if the call
        succeeds.

        Threads may share a layer: each forward and each backward runs under
        the layer's lock, so no update or increment is lost.  ``backward``
        uses the input of the most recent ``forward``, so a thread's forward
        and backward must not interleave with another thread's on the same
        layer (as with any stateful layer: give each thread its own, or
        serialise the steps).
        """
        with self._lock:
            return self._forward(x)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # locks do not pickle or copy; each copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _forward(self, x: ArrayT) -> ArrayT:
        self._check_input(x)
        self._follow(_dispatch.backend_for(x))
        tracking = self.track_running_stats
        count = self.num_batches_tracked
        if self.training and tracking:
            # torch's rule: a count of None is not counted, and the given momentum is used (_check_input
            # refused None with momentum=None).
            count = None if count is None else int(count) + 1
            momentum = self.momentum if self.momentum is not None else 1.0 / cast(int, count)
        else:
            # No update happens; the functional API still wants a float.
            momentum = 0.0 if self.momentum is None else self.momentum
        # The kernel updates the running statistics in place; the count is stored after it returns.  An
        # asynchronous exception (KeyboardInterrupt, a signal handler's) can land in between, at the first
        # Python step after the kernel, so a training call keeps copies of the statistics and puts them back
        # if anything escapes: the statistics and the count always move together (tests/test_faults.py).
        snapshot = _Snapshot(self) if self.training and tracking else None
        try:
            y, saved = _forward(
                x,
                self.weight,
                self.bias,
                running_mean=self.running_mean if tracking else None,
                running_var=self.running_var if tracking else None,
                training=self.training,
                momentum=momentum,
                eps=self.eps,
                axis=self.axis,
                process_group=self.process_group,
            )
            # One step: no exception can land between these stores (no call between them).
            self.num_batches_tracked, self._cache = count, (x, saved)
        except BaseException:
            if snapshot is not None:
                snapshot.restore(self)
            raise
        return y

    def _follow(self, backend: Any) -> None:
        """Move parameters and running statistics to where ``backend`` computes (a copy, once)."""
        names = ("weight", "bias", "running_mean", "running_var")
        for name in names:
            array = getattr(self, name)
            if array is None:
                continue
            on_host = isinstance(array, np.ndarray)
            if backend.name == "cpu" and not on_host:
                setattr(self, name, _to_numpy(array))
            elif backend.name != "cpu" and on_host:
                setattr(self, name, backend.from_host(array))

    def __call__(self, x: ArrayT) -> ArrayT:
        """Same as :meth:`forward`."""
        return self.forward(x)

    def backward(self, dy: ArrayT) -> ArrayT:
        """Gradient of the loss with respect to the input of the last forward.

        Parameters
        ----------
        dy : array
            Gradient with respect to the last output, same shape as it.

        Returns
        -------
        dx : array
            Gradient with respect to the last input, same shape and dtype.

        Raises
        ------
        RuntimeError
            If no forward has been run.

        Notes
        -----
        Stores ``grad_weight`` and ``grad_bias`` (when ``affine``), replacing
        earlier ones.  The formulas follow the mode of the last forward: in
        eval mode the statistics are constants.
        """
        with self._lock:
            if self._cache is None:
                raise RuntimeError("backward: call forward (layer(x)) before backward")
            x, saved = self._cache
            dx, grad_weight, grad_bias = _backward(dy, x, self.weight, saved, axis=self.axis)
            if self.affine:
                self.grad_weight = grad_weight
                self.grad_bias = grad_bias
            return cast(ArrayT, dx)  # backward returns dy's kind of array

    # --------------------------------------------------------- optimizer ---
    def parameters(self) -> list[Any]:
        """The trainable arrays, to be updated in place by an optimizer.

        Returns
        -------
        list of array
            ``[weight, bias]``, or ``[]`` when ``affine=False``.  The same
            order as :meth:`gradients`.
        """
        return [self.weight, self.bias] if self.affine else []

    def gradients(self) -> list[Any]:
        """Gradients of the last :meth:`backward`, paired with :meth:`parameters`.

        Returns
        -------
        list of array
            ``[grad_weight, grad_bias]``, or ``[]`` when ``affine=False``.

        Raises
        ------
        RuntimeError
            If ``affine`` and no backward has been run yet.

        Examples
        --------
        A plain SGD step:

        >>> for p, g in zip(layer.parameters(), layer.gradients()):  # doctest: +SKIP
        ...     p -= lr * g
        """
        if not self.affine:
            return []
        if self.grad_weight is None or self.grad_bias is None:
            raise RuntimeError("gradients: call backward before asking for gradients")
        return [self.grad_weight, self.grad_bias]

    # ------------------------------------------------------------- state ---
    def reset_running_stats(self) -> None:
        """Reset running statistics to mean 0, variance 1 and the counter to 0, in place."""
        if self.track_running_stats:
            _copy_into(self.running_mean, np.zeros(self.num_features, dtype=self.dtype))
            _copy_into(self.running_var, np.ones(self.num_features, dtype=self.dtype))
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``weight`` to 1 and ``bias`` to 0, in place."""
        self.reset_running_stats()
        if self.affine:
            _copy_into(self.weight, np.ones(self.num_features, dtype=self.dtype))
            _copy_into(self.bias, np.zeros(self.num_features, dtype=self.dtype))

    def _expected_keys(self) -> list[str]:
        keys: list[str] = []
        if self.affine:
            keys += _PARAM_KEYS
        if self.track_running_stats:
            keys += (*_STAT_KEYS, _COUNT_KEY)
        return keys

    def state_dict(self, *, prefix: str = "") -> dict[str, StateArray]:
        """The layer's state under PyTorch's keys, as NumPy copies.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every key, e.g. ``"bn1."`` to build a whole model's
            dict.

        Returns
        -------
        dict of str to numpy.ndarray
            ``weight`` and ``bias`` (if ``affine``), ``running_mean``,
            ``running_var`` and ``num_batches_tracked`` (a 0-d int64 array,
            as PyTorch's is a 0-d int64 tensor), if ``track_running_stats``.
            ``torch.as_tensor`` on each value gives a dict that
            ``torch.nn.BatchNorm*d.load_state_dict`` accepts.
        """
        state: dict[str, StateArray] = {}
        for key in self._expected_keys():
            if key == _COUNT_KEY:
                state[prefix + key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[prefix + key] = _to_host(getattr(self, key))
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, strict: bool = True, prefix: str = ""
    ) -> tuple[list[str], list[str]]:
        """Copy parameters and statistics from a PyTorch-style state dict, in place.

        Parameters
        ----------
        state_dict : mapping of str to array, tensor or number
            For example ``torch.nn.BatchNorm2d(...).state_dict()`` (torch
            tensors, on any device) or :meth:`state_dict`'s output.  Values
            are cast to the layer's dtype.
        strict : bool, default True
            Whether missing and unexpected keys are an error.
        prefix : str, default ""
            Only keys starting with it are read, with it removed, e.g.
            ``"features.1."`` to pick one layer out of a whole model's dict.

        Returns
        -------
        missing_keys : list of str
            Expected keys that were absent (empty when ``strict``).
        unexpected_keys : list of str
            Keys under ``prefix`` that the layer has no use for (empty when
            ``strict``).

        Raises
        ------
        StateDictKeyError
            If ``strict`` and keys are missing or unexpected: a KeyError, as
            a mapping's missing key is, and a ValueError, as every other bad
            argument of fastbn is.
        ValueError
            If a value has the wrong shape or is not a real number.
        TypeError
            If ``state_dict`` is not a mapping.

        Notes
        -----
        A missing ``num_batches_tracked`` is never an error and leaves the
        counter unchanged, as in PyTorch (checkpoints from before PyTorch
        0.4.1 lack it).  Nothing is changed unless every value is valid.
        Arrays are overwritten in place, so references an optimizer holds
        stay valid.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        strict = check_flag(strict, "strict")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")

        ours = {key[len(prefix) :]: key for key in state_dict if isinstance(key, str) and key.startswith(prefix)}
        expected = self._expected_keys()
        missing = [prefix + k for k in expected if k not in ours and k != _COUNT_KEY]
        unexpected = [ours[k] for k in ours if k not in expected]
        if strict and (missing or unexpected):
            raise StateDictKeyError(f"state_dict: missing keys {missing}, unexpected keys {unexpected} for {self!r}")

        # Convert and check everything first, so a bad entry changes nothing.
        new: dict[str, Any] = {}
        for key in expected:
            if key not in ours:
                continue
            full = ours[key]
            value = _to_numpy(state_dict[full])
            if value.dtype.kind not in "fiu":
                raise ValueError(f"{full}: expected real numbers, got dtype {value.dtype}")
            if key == _COUNT_KEY:
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ValueError(f"{full}: expected one integer, got dtype {value.dtype} and shape {value.shape}")
                count = int(value.reshape(()))
                if count < 0:
                    raise ValueError(f"{full}: expected a count >= 0, got {count}")
                new[key] = count
            else:
                if value.shape != (self.num_features,):
                    raise ValueError(f"{full}: expected shape ({self.num_features},), got {value.shape}")
                new[key] = value.astype(self.dtype)

        for key, value in new.items():
            if key == _COUNT_KEY:
                self.num_batches_tracked = value
            else:
                _copy_into(getattr(self, key), value)
        return missing, unexpected

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name})"
        )
