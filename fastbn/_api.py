"""fastbn's public functions :func:`forward` and :func:`backward` (and :class:`Saved`).

The step-by-step ones (moments, normalize, fold) are in :mod:`fastbn._steps`.

Each reads top to bottom: pick the backend and bring the arrays to it
(:mod:`fastbn._dispatch`), check every option (:mod:`fastbn._options`) and
array (:mod:`fastbn._validate`), call the backend through its interface
(:class:`fastbn.backends.Backend`), and return the caller's kind of array.
All checks run before the first kernel, so an error leaves every buffer
untouched.

``forward``, ``backward``, ``moments`` and ``normalize`` take a private
``_plan`` argument, for tests: a mapping of CPU plan fields to force (see
:func:`fastbn.backends.cpu.plan.choose`).  Plans never change a result.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from fastbn import _dispatch, _options, _sync, _weights
from fastbn._saved import check_saved_fields, check_saved_invstd, check_saved_weights
from fastbn._typing import ArrayT, BackendName, OptionalArray, Plan, SupportsArray
from fastbn._validate import (
    check_axis,
    check_channel_vector,
    check_channels,
    check_like_x,
    check_running,
    check_variance,
    check_x,
    sequence_conversion,
    stats_dtype,
)

__all__ = ["Saved", "backward", "forward"]


class Saved(NamedTuple):
    """What :func:`forward` keeps for :func:`backward`.

    Attributes
    ----------
    mean : numpy.ndarray
        Per-channel mean used to normalise: the batch mean, or the running mean
        in eval mode.  float32 for float16/bfloat16/float32 input, float64 for
        float64.
    invstd : numpy.ndarray
        Per-channel ``1 / sqrt(var + eps)`` used to normalise, same dtype.
    batch_stats : bool
        True if batch statistics were used (training, or no running stats),
        so backward applies the training formula; False for eval mode, where
        the statistics are constants.
    count : int
        Elements per channel that the statistics were computed over.
    shape : tuple of int
        Shape of the forward input, checked again by backward.
    axis : int
        Non-negative channel axis of the forward input.
    process_group : object or None
        The process group the statistics were synchronised over (then
        ``count`` is the global count and backward synchronises too).
    activation : str or None
        ``"relu"`` if forward applied it: backward then needs forward's output.
    residual : bool
        Whether forward added a residual: backward then returns its gradient.
    virtual_batch_size : int or None
        The ghost batch size, if forward normalised ghost batches: then
        ``mean`` and ``invstd`` have one row per ghost batch, shape ``(G, C)``,
        and ``count`` is the count per channel of one ghost batch.
    r, d : numpy.ndarray or None
        Batch renormalization's per-channel correction, constants for
        backward; None without it.
    weights : numpy.ndarray or None
        The statistics' weights (a mask as 0/1), x's shape in the statistics
        dtype, when forward was given ``weights`` or ``mask`` and used batch
        statistics; None otherwise.
    weight_sum : numpy.ndarray or None
        Their per-channel sum ``W``, float64, with ``weights``.

    Examples
    --------
    >>> _, saved = fastbn.forward(np.arange(8, dtype=np.float32).reshape(4, 2))
    >>> saved.mean, saved.count, saved.batch_stats
    (array([3., 4.], dtype=float32), 4, True)
    """

    mean: SupportsArray  # per-channel: NumPy arrays from the CPU backend, Numba device arrays from the CUDA one
    invstd: SupportsArray
    batch_stats: bool
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, as documented
    shape: tuple[int, ...]
    axis: int
    process_group: object = None
    activation: str | None = None
    residual: bool = False
    virtual_batch_size: int | None = None
    r: SupportsArray | None = None
    d: SupportsArray | None = None
    weights: SupportsArray | None = None
    weight_sum: SupportsArray | None = None


def forward(
    x: ArrayT,
    weight: OptionalArray = None,
    bias: OptionalArray = None,
    *,
    running_mean: OptionalArray = None,
    running_var: OptionalArray = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    backend: BackendName = None,
    process_group: object = None,
    activation: Literal["relu"] | None = None,
    residual: OptionalArray = None,
    virtual_batch_size: int | None = None,
    renorm: tuple[float, float] | None = None,
    weights: npt.ArrayLike | None = None,
    mask: npt.ArrayLike | None = None,
    _plan: Plan = None,
    _any_momentum: bool = False,
) -> tuple[ArrayT, Saved]:
    """Batch-normalise ``x`` over every axis but the channel axis.

    Follows ``torch.nn.functional.batch_norm``: in training, normalise with
    the batch mean and biased variance and, if running statistics are given,
    update them in place with the unbiased variance; with ``training=False``
    and running statistics, normalise with those; with ``training=False`` and
    none, use batch statistics.

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, bfloat16 (``ml_dtypes.bfloat16``, or a
        bfloat16 torch tensor; CPU only), float32 or float64 and rank >= 2,
        any strides.
    weight, bias : numpy.ndarray, optional
        Per-channel scale and shift, shape ``(C,)``, in the statistics dtype
        (float32 for float16/bfloat16/float32 input, float64 for float64).
        Default 1 and 0.
    running_mean, running_var : numpy.ndarray, optional
        Per-channel running statistics in the statistics dtype; both or
        neither.  Updated in place when ``training`` is True, so they must
        then be writable memory of their own; only read in eval, where
        read-only arrays will do.
    training : bool, default True
        Use batch statistics (and update running ones) if True.
    momentum : float, default 0.1
        In [0, 1]: ``running = (1 - momentum) * running + momentum * batch``.
        Note that Keras and Flax use the opposite convention.
    eps : float, default 1e-5
        Added to the variance before the square root: positive, or zero when
        the running statistics normalise (eval mode), as in PyTorch.
    axis : int, default 1
        The channel axis: 1 for (N, C), (N, C, L), NCHW, NCDHW; -1 for
        channels-last.  Any valid axis, negative ones too.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.  Arguments on the other side of the
        host/device line are a ValueError.
    process_group : object, optional
        Synchronise batch statistics across processes: an mpi4py
        communicator, a torch.distributed process group, or any object with
        ``allgather`` and ``allreduce_sum`` methods (see
        ``fastbn.Collectives``).  Every process must call with the same C,
        dtype and flags; a process may hold an empty batch.  The matching
        backward synchronises too.  Unused when running statistics are used.
        Not combined with the four options below yet.
    activation : {None, "relu"}, default None
        ``"relu"`` returns ``relu(BN(x) + residual)``, computed in the same
        pass that writes the output.  Backward then needs that output (its
        ``y`` argument) for the mask; nothing more is saved.
    residual : numpy.ndarray, optional
        Added to the normalised output before the activation (the residual
        block's ``relu(BN(x) + z)``); x's shape and dtype, any strides.
        Backward then returns its gradient as a fourth value.
    virtual_batch_size : int, optional
        Ghost batch norm: whenever batch statistics are used, each group of
        this many consecutive samples along axis 0 is normalised with its own
        statistics.  It must divide ``x.shape[0]``, and the channel axis must
        not be 0.  In training, the running statistics are updated once, with
        the average over the groups of their means and of their unbiased
        variances.  ``saved.mean`` and ``saved.invstd`` are then ``(G, C)``.
    renorm : tuple of (float, float), optional
        ``(rmax, dmax)``: batch renormalization (Ioffe 2017), in training with
        running statistics, computed from them as they were before this step
        updates them: ``r = clip(sigma / sigma_running, 1/rmax, rmax)``,
        ``d = clip((mean - mean_running) / sigma_running, -dmax, dmax)`` with
        ``sigma = sqrt(var + eps)``, and ``y = ((x - mean) / sigma * r + d) *
        weight + bias``.  ``rmax >= 1``, ``dmax >= 0``; ``(1, 0)`` is plain
        batch norm, ``inf`` disables a clip.  No effect in eval mode; not
        combined with ``virtual_batch_size``.
    weights : numpy.ndarray, optional
        Statistics over weighted positions: finite non-negative weights
        broadcastable to x, as for :func:`moments` (``mean = sum(w x) /
        sum(w)``, biased ``var = sum(w (x - mean)^2) / sum(w)``, 0 and 0 where
        ``sum(w)`` is 0); the output is normalised everywhere.  The running
        variance takes the unbiased ``var * W / (W - 1)`` with ``W = sum(w)``
        per channel; a channel with ``W <= 1`` keeps its running statistics.
        Used only where batch statistics are; CPU only; not combined with
        ``process_group``, ``virtual_batch_size`` or ``renorm`` yet.
    mask : numpy.ndarray of bool, optional
        Positions that count in the statistics (True), as Keras's and Flax's
        ``mask``: broadcastable to x, or x's shape without the channel axis.
        The same as ``weights=mask``.
    _plan : mapping, optional
        Private, for tests: CPU plan fields to force, ``{"strategy":
        "fused" | "streamed", "nontemporal": bool}`` (see
        :func:`fastbn.backends.cpu.plan.choose`).  A plan never changes a
        result; the CUDA backend refuses it.
    _any_momentum : bool, default False
        Private, for :mod:`fastbn.torch`: admit any finite momentum, as
        ``torch.nn.functional.batch_norm`` does.

    Returns
    -------
    y : numpy.ndarray
        Same shape and dtype as ``x``; channels-last input gives channels-last
        output.
    saved : Saved
        What :func:`backward` needs.

    Raises
    ------
    TypeError, ValueError
        On any invalid argument, before any computation; the message starts
        with the argument's name.  In training, a channel with a single value
        is a ValueError, as in PyTorch.

    Notes
    -----
    The variance is computed in two passes (or per block and merged with
    Chan's formula): never as E[x^2] - E[x]^2.  On the CPU it accumulates in
    float64; on CUDA in float32 (float64 for float64 input) within a block,
    on values shifted by a per-channel pivot, with blocks merged in float64.
    NaN or Inf in a channel of ``x`` make that channel's statistics and output
    NaN (and its running statistics, in training), as in PyTorch; other
    channels are unaffected.

    Examples
    --------
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)  # (N, C): 4 samples, 2 channels
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> y, saved = fastbn.forward(x, running_mean=rm, running_var=rv)
    >>> np.round(y[:, 0], 3), np.round(rm, 3)
    (array([-1.342, -0.447,  0.447,  1.342], dtype=float32), array([0.3, 0.4], dtype=float32))
    """
    if (
        type(x) is np.ndarray
        and backend in (None, "cpu")
        and activation is None
        and residual is None
        and virtual_batch_size is None
        and renorm is None
        and weights is None
        and mask is None
        and process_group is None
        and _plan is None
    ):
        small = _small().forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis)
        if small is not None:  # a plain call, computed as below would compute it (see fastbn.backends.cpu.small)
            return small[0], Saved(*small[1])
    given = x
    ops, restore, (x, weight, bias, running_mean, running_var, residual, weights, mask) = _dispatch.prepare(
        backend,
        [
            ("x", x),
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("residual", residual),
            ("weights", weights),
            ("mask", mask),
        ],
        # Eval only reads them: an expanded tensor or a list is taken as any input (torch takes the former).
        read_only=("running_mean", "running_var") if training is False else (),
    )
    x = check_x(x)
    sequence_conversion(
        given,
        x,
        "x",
        (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("residual", residual),
            ("weights", weights),
            ("mask", mask),
        ),
    )
    axis = check_axis(axis, len(x.shape))
    opts = _options.options(
        x=x,
        axis=axis,
        training=training,
        momentum=momentum,
        eps=eps,
        activation=activation,
        residual=residual,
        virtual_batch_size=virtual_batch_size,
        renorm=renorm,
        process_group=process_group,
        any_momentum=_any_momentum,
    )
    channels, count = check_channels(x, axis, allow_empty=True)
    dtype = stats_dtype(x.dtype)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_channel_vector(value, name, channels, dtype)
    has_running = check_running(
        running_mean,
        running_var,
        channels,
        dtype,
        (("weight", weight), ("bias", bias), ("x", x), ("residual", residual), ("weights", weights), ("mask", mask)),
        updated=opts.training,
    )
    batch_stats, groups = _options.resolve(opts, tuple(x.shape), axis, has_running, dtype)
    if has_running and (not batch_stats or opts.renorm is not None):
        check_variance(running_var, "running_var")  # read: eval normalises with it, renorm scales by it
    if opts.collectives is not None and ops.sync is None:
        raise ValueError(f"process_group: not supported on the {ops.name} backend yet")
    if opts.collectives is not None and _plan is not None:
        raise ValueError("_plan: not supported together with process_group")

    w = _weights.check_weights(weights, mask, tuple(x.shape), axis, dtype) if batch_stats else None
    if w is not None:
        named = "weights" if weights is not None else "mask"
        if ops.name != "cpu":
            raise ValueError(f"{named}: not supported on the {ops.name} backend yet")
        for option, given_ in (
            ("process_group", opts.collectives is not None),
            ("virtual_batch_size", groups > 1),
            ("renorm", opts.renorm is not None),
        ):
            if given_:
                raise ValueError(f"{named}: not supported together with {option} yet")

    update = opts.training and has_running
    if count == 0 and opts.collectives is None:
        # An empty batch, as PyTorch: an empty output, the running statistics left alone.
        mean, invstd = (ops.from_host(np.full(channels, np.nan, dtype)) for _ in range(2))  # two arrays
        empty = ops.from_host(np.empty(tuple(x.shape), x.dtype))
        return restore(empty), Saved(
            mean, invstd, batch_stats, 0, tuple(x.shape), axis, None, opts.activation, residual is not None
        )
    if w is not None:
        y, mean, invstd, wsum = ops.weighted_forward(
            x,
            w,
            axis,
            dtype,
            weight,
            bias,
            opts.eps,
            running_mean,
            running_var,
            opts.momentum,
            update,
            relu=opts.activation == "relu",
            residual=residual,
        )
        return restore(y), Saved(
            mean,
            invstd,
            True,
            count,
            tuple(x.shape),
            axis,
            None,
            opts.activation,
            residual is not None,
            weights=w,
            weight_sum=wsum,
        )
    if batch_stats and opts.collectives is not None:
        assert ops.sync is not None  # checked above
        y, mean, invstd, count = _sync.forward(
            ops.sync,
            opts.collectives,
            x,
            axis,
            dtype,
            weight,
            bias,
            opts.eps,
            running_mean,
            running_var,
            opts.momentum,
            opts.training,
            update,
        )
        return restore(y), Saved(mean, invstd, True, count, tuple(x.shape), axis, process_group)
    relu = opts.activation == "relu"
    r = d = None
    if batch_stats:
        y, mean, invstd, r, d = ops.forward_batch(
            x,
            axis,
            dtype,
            weight,
            bias,
            opts.eps,
            running_mean,
            running_var,
            opts.momentum,
            update,
            relu=relu,
            residual=residual,
            renorm=opts.renorm if opts.training else None,
            groups=groups,
            plan=_plan,
        )
    else:
        y, mean, invstd = ops.forward_eval(
            x, axis, dtype, weight, bias, opts.eps, running_mean, running_var, relu=relu, residual=residual, plan=_plan
        )
    return restore(y), Saved(
        mean,
        invstd,
        batch_stats,
        count // groups,
        tuple(x.shape),
        axis,
        None,
        opts.activation,
        residual is not None,
        virtual_batch_size if groups > 1 else None,
        r,
        d,
    )


def backward(
    dy: ArrayT,
    x: ArrayT,
    weight: OptionalArray,
    saved: Saved,
    *,
    axis: int = 1,
    backend: BackendName = None,
    y: OptionalArray = None,
    _plan: Plan = None,
) -> tuple[ArrayT, ...]:
    """Gradients of :func:`forward` with respect to x, weight and bias (and the residual).

    Parameters
    ----------
    dy : numpy.ndarray
        Gradient of the loss with respect to forward's output; same shape and
        dtype as ``x``.
    x : numpy.ndarray
        The input that was given to forward.
    weight : numpy.ndarray or None
        The weight that was given to forward (None means 1).
    saved : Saved
        The second value forward returned for this ``x``.
    axis : int, default 1
        The channel axis, as given to forward.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``dy``.
    y : numpy.ndarray, optional
        Forward's output; required when forward used ``activation="relu"``:
        the gradient passes where ``y > 0`` (as PyTorch's ReLU backward).
        Ignored otherwise.
    _plan : mapping, optional
        Private, for tests: CPU plan fields to force, as for :func:`forward`.

    Returns
    -------
    dx : numpy.ndarray
        Same shape, dtype and memory order as ``x``.
    dweight, dbias : numpy.ndarray
        Per-channel, in the statistics dtype; returned even when ``weight``
        is None.
    dresidual : numpy.ndarray
        Only when forward was given a residual: its gradient, the gradient
        at the output of ``BN(x) + residual`` (``dy`` after the ReLU's mask);
        like ``dx``.

    Notes
    -----
    With batch statistics (``saved.batch_stats``), with ``k = dotp *
    invstd**2 / n``: ``dx = (dy - sum_dy / n - (x - mean) * k) * invstd *
    weight``.  In eval mode the statistics are constants: ``dx = dy * invstd *
    weight``.  In both, ``dweight = dotp * invstd`` and ``dbias = sum_dy``,
    where ``sum_dy = sum(dy)`` and ``dotp = sum((x - mean) * dy)`` per channel.
    With the ReLU, ``dy`` is first masked by ``y > 0``.  With batch
    renormalization, ``r`` and ``d`` are constants: dx is the training formula
    with weight ``r * weight``, ``dweight = r * dotp * invstd + d * sum_dy``.
    With ghost batches, each group gets its own formula and statistics, and
    dweight and dbias are summed over the groups.

    Examples
    --------
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)  # (N, C): 4 samples, 2 channels
    >>> dx, dweight, dbias = fastbn.backward(np.ones_like(x), x, None, fastbn.forward(x)[1])
    >>> bool(np.allclose(dx, 0, atol=1e-6)), dbias
    (True, array([4., 4.], dtype=float32))
    """
    if (
        type(saved) is Saved
        and saved.batch_stats is True
        and saved.process_group is None
        and saved.activation is None
        and saved.residual is False
        and saved.virtual_batch_size is None
        and saved.r is None
        and saved.d is None
        and saved.weights is None
        and saved.weight_sum is None
        and type(saved.count) is int
        and saved.count >= 0
        and type(saved.shape) is tuple
        and all(type(size) is int for size in saved.shape)  # (8, 3.0) == (8, 3): the full path refuses it
        and type(saved.axis) is int
        and y is None
        and backend in (None, "cpu")
        and _plan is None
    ):
        small = _small().backward(dy, x, weight, saved.mean, saved.invstd, saved.shape, saved.axis, axis)
        if small is not None:
            return small  # type: ignore[no-any-return]  # dy is an ndarray, so ArrayT is too
    given_dy, given_x = dy, x
    ops, restore, (dy, x, weight, y) = _dispatch.prepare(backend, [("dy", dy), ("x", x), ("weight", weight), ("y", y)])
    x = check_x(x)
    dy = check_x(dy, "dy")
    saved_mean = getattr(saved, "mean", None) if isinstance(saved, Saved) else None
    sequence_conversion(given_x, x, "x", (("dy", dy), ("weight", weight), ("saved.mean", saved_mean)))
    sequence_conversion(given_dy, dy, "dy", (("x", x),))
    axis = check_axis(axis, len(x.shape))
    if not isinstance(saved, Saved):
        raise TypeError(f"saved: expected the fastbn.Saved returned by fastbn.forward, got {type(saved).__name__}")
    check_saved_fields(saved)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy: expected the dtype of x ({x.dtype}), got {dy.dtype}")
    synced = saved.process_group is not None and saved.batch_stats
    channels, count = check_channels(x, axis, allow_empty=True)
    if tuple(saved.shape) != tuple(x.shape) or saved.axis != axis:
        raise ValueError(
            f"saved: came from forward on shape {tuple(saved.shape)} with channel axis {saved.axis}, "
            f"but x has shape {tuple(x.shape)} and axis is {axis}"
        )
    dtype = stats_dtype(x.dtype)
    try:
        groups = _options.ghost_groups(saved.virtual_batch_size, tuple(x.shape), axis)
    except ValueError as exc:  # saved.shape matches x, so forward cannot have made this Saved
        raise ValueError(f"saved.{exc}") from None
    rows = None if groups == 1 else groups  # one row of statistics per ghost batch
    for name in ("mean", "invstd"):
        check_channel_vector(getattr(saved, name), f"saved.{name}", channels, dtype, rows=rows)
    check_saved_invstd(saved.invstd)
    if saved.r is not None:
        check_channel_vector(saved.r, "saved.r", channels, dtype)
        check_channel_vector(saved.d, "saved.d", channels, dtype)
    if weight is not None:
        check_channel_vector(weight, "weight", channels, dtype)
    if saved.activation == "relu":
        if y is None:
            raise ValueError("y: forward applied activation='relu'; pass its output as y, backward masks dy with it")
        check_like_x(y, "y", x)
    else:
        y = None

    weighted = saved.weights is not None and saved.batch_stats
    if weighted:
        if not isinstance(saved.weights, np.ndarray) or tuple(saved.weights.shape) != tuple(x.shape):
            raise TypeError(
                f"saved.weights: expected an array of x's shape {tuple(x.shape)}, as fastbn.forward keeps them"
            )
        if np.dtype(saved.weights.dtype) != dtype:
            raise TypeError(
                f"saved.weights: expected dtype {dtype}, as fastbn.forward keeps them, got {saved.weights.dtype}"
            )
        check_channel_vector(saved.weight_sum, "saved.weight_sum", channels, np.dtype(np.float64))
        check_saved_weights(saved.weights, np.asarray(saved.weight_sum), axis)
    elif saved.batch_stats and saved.weight_sum is not None:
        # forward keeps both or neither: the weights without their sum would silently give the unweighted
        # gradient of a weighted forward.
        raise TypeError("saved.weights: None, but saved.weight_sum is set; fastbn.forward keeps both or neither")

    if synced and saved.count < count:
        raise ValueError(
            f"saved.count: {saved.count} elements per channel over all processes, fewer than this process's own "
            f"{count}; fastbn.forward keeps the global count"
        )
    if count == 0 and not synced:
        # An empty batch: nothing flows back; the parameter gradients are sums over no elements.
        dweight, dbias = (ops.from_host(np.zeros(channels, dtype)) for _ in range(2))  # two arrays
        dx = ops.from_host(np.empty(tuple(x.shape), x.dtype))
        if saved.residual:
            dres = ops.from_host(np.empty(tuple(x.shape), x.dtype))
            return restore(dx), restore(dweight), restore(dbias), restore(dres)
        return restore(dx), restore(dweight), restore(dbias)
    if weighted:
        dx, dweight, dbias, dresidual = ops.weighted_backward(
            dy,
            x,
            saved.weights,
            saved.weight_sum,
            axis,
            dtype,
            weight,
            saved.mean,
            saved.invstd,
            y=y,
            dresidual=saved.residual,
        )
        if saved.residual:
            return restore(dx), restore(dweight), restore(dbias), restore(dresidual)
        return restore(dx), restore(dweight), restore(dbias)
    if synced:
        if _plan is not None:
            raise ValueError("_plan: not supported together with process_group")
        assert ops.sync is not None  # a synchronised forward ran on this backend
        dx, dweight, dbias = _sync.backward(
            ops.sync,
            _sync.adapt(saved.process_group),
            dy,
            x,
            axis,
            dtype,
            weight,
            saved.mean,
            saved.invstd,
            saved.count,
        )
        return restore(dx), restore(dweight), restore(dbias)
    dx, dweight, dbias, dresidual = ops.backward(
        dy,
        x,
        axis,
        dtype,
        weight,
        saved.mean,
        saved.invstd,
        saved.batch_stats,
        y=y,
        dresidual=saved.residual,
        r=saved.r,
        d=saved.d,
        groups=groups,
        plan=_plan,
    )
    if saved.residual:
        return restore(dx), restore(dweight), restore(dbias), restore(dresidual)
    return restore(dx), restore(dweight), restore(dbias)


@functools.cache
def _small() -> ModuleType:
    """:mod:`fastbn.backends.cpu.small`, imported on first use (``import fastbn`` does not import Numba)."""
    return importlib.import_module("fastbn.backends.cpu.small")
