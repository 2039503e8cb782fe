"""The options of a batch-norm call and their legal combinations, in one place.

:func:`fastbn.forward`, the layer (:class:`fastbn.BatchNorm`) and the JAX
adapter (:mod:`fastbn.jax`) all check their scalar options here, and
:func:`resolve` is the single statement of which combinations are legal:

===========================  ===============================================
option                       rule
===========================  ===============================================
``training``                 True or False
``momentum``                 a float in [0, 1] (None, cumulative average, in the layer)
``eps``                      a positive finite float
``activation``               None or ``"relu"``
``residual``                 an array like x (checked with the arrays)
``virtual_batch_size``       a positive integer dividing the batch; channel axis not 0
``renorm``                   ``(rmax, dmax)``, rmax >= 1, dmax >= 0; needs running
                             statistics in training; not with ghost batches
``process_group``            MPI, torch.distributed or :class:`fastbn.Collectives`;
                             none of the four options above with it (yet)
===========================  ===============================================

Each check raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong value)
with a message that starts with the argument's name, before any kernel runs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple, overload

import numpy as np

from fastbn import _sync
from fastbn._validate import check_like_x

__all__ = [
    "ACTIVATIONS",
    "Options",
    "check_eps",
    "check_flag",
    "check_momentum",
    "check_process_group",
    "ghost_groups",
    "options",
    "resolve",
]

ACTIVATIONS = (None, "relu")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _as_float(value: Any, name: str, expected: str) -> float:
    """``float(value)`` for a real number; a ValueError naming ``name`` where it has no float (10**400)."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected {expected}, got a number too large for a float") from None


def check_flag(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool, or raise."""
    if not _is_bool(value):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return bool(value)


def check_eps(eps: Any, *, allow_zero: bool = False) -> float:
    """Return ``eps`` as a positive finite float (or zero, where ``allow_zero``), or raise.

    ``allow_zero`` is for calls that may normalise with given statistics
    (eval mode, as PyTorch allows): :func:`resolve` then refuses zero where
    batch statistics are used, since a constant channel would give 1/0.
    """
    if _is_bool(eps) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
    eps = _as_float(eps, "eps", "a positive finite float")
    if not (math.isfinite(eps) and (eps > 0 or (allow_zero and eps == 0))):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return float(eps)


@overload
def check_momentum(momentum: Any, *, allow_none: Literal[False] = False, any_finite: bool = False) -> float: ...
@overload
def check_momentum(momentum: Any, *, allow_none: bool, any_finite: bool = False) -> float | None: ...
def check_momentum(momentum: Any, *, allow_none: bool = False, any_finite: bool = False) -> float | None:
    """Return ``momentum`` as a float in [0, 1] (or None, where ``allow_none``: the layer's cumulative average).

    ``any_finite`` admits any finite float, as ``torch.nn.functional.batch_norm``
    does (values outside [0, 1] extrapolate); only :mod:`fastbn.torch` asks it.
    """
    if momentum is None and allow_none:
        return None
    if _is_bool(momentum) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum: expected a float in [0, 1], got {type(momentum).__name__}")
    momentum = _as_float(momentum, "momentum", "a float in [0, 1]" if not any_finite else "a finite float")
    if any_finite and math.isfinite(momentum):
        return float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum}")
    return float(momentum)


def check_activation(activation: Any) -> str | None:
    """Return ``activation`` if it is None or ``"relu"``, or raise."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation: expected None or 'relu', got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    return activation


def check_virtual_batch_size(value: Any) -> int | None:
    """Return ``virtual_batch_size`` as a positive int, or None."""
    if value is None:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"virtual_batch_size: expected a positive integer, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"virtual_batch_size: expected a positive integer, got {value}")
    return int(value)


def check_renorm(renorm: Any) -> tuple[float, float] | None:
    """Return ``renorm`` as ``(rmax, dmax)`` floats with rmax >= 1 and dmax >= 0 (inf allowed), or None."""
    if renorm is None:
        return None
    message = "renorm: expected a pair (rmax, dmax) of numbers with rmax >= 1 and dmax >= 0"
    if (
        not isinstance(renorm, (tuple, list, np.ndarray))
        or (isinstance(renorm, np.ndarray) and renorm.ndim != 1)
        or len(renorm) != 2
    ):
        shape = f" of shape {renorm.shape}" if isinstance(renorm, np.ndarray) else ""
        raise TypeError(f"{message}, got {type(renorm).__name__}{shape}")
    values = []
    for name, value in zip(("rmax", "dmax"), renorm):
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise TypeError(f"{message}, got {name} of type {type(value).__name__}")
        values.append(_as_float(value, "renorm", f"{name} within the float range"))
    rmax, dmax = values
    if not rmax >= 1.0 or not dmax >= 0.0:  # also rejects NaN
        raise ValueError(f"{message}, got ({rmax}, {dmax})")
    return rmax, dmax


def ghost_groups(virtual_batch_size: int | None, shape: tuple[int, ...], axis: int) -> int:
    """The number of ghost batches of ``virtual_batch_size`` samples in input of ``shape`` (1 if None).

    Ghost batches are groups of consecutive samples along axis 0, the batch
    axis, so the channel axis must be another one and the size must divide
    the batch.  An empty batch counts as one (empty) group.
    """
    virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    if virtual_batch_size is None:
        return 1
    batch = shape[0]
    if axis == 0:
        raise ValueError("virtual_batch_size: ghost batches split axis 0, the batch axis, but it is the channel axis")
    if batch % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size: {virtual_batch_size} does not divide the batch size {batch} (axis 0 of shape {shape})"
        )
    return max(1, batch // virtual_batch_size)  # an empty batch is one empty group


class Options(NamedTuple):
    """A call's checked options (see the module docstring)."""

    training: bool
    momentum: float
    eps: float
    activation: str | None = None
    residual: bool = False
    virtual_batch_size: int | None = None
    #: Ghost batches in the input (1 without them).
    groups: int = 1
    renorm: tuple[float, float] | None = None
    #: The process group adapted to :class:`fastbn.Collectives`, or None.
    collectives: Any = None


def check_process_group(process_group: Any) -> Any:
    """``process_group`` adapted to :class:`fastbn.Collectives` (None stays None), or a TypeError."""
    return None if process_group is None else _sync.adapt(process_group)


def options(
    *,
    x: Any = None,
    axis: int = 1,
    training: Any = True,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
    activation: Any = None,
    residual: Any = None,
    virtual_batch_size: Any = None,
    renorm: Any = None,
    process_group: Any = None,
    any_momentum: bool = False,
) -> Options:
    """Check each option on its own, in a fixed order, and return them as :class:`Options`.

    The order is fastbn.forward's: training, momentum, eps, activation, the
    residual (an array like ``x``), renorm, the ghost batch size (that it
    splits ``x``'s batch), the process group; the first bad one raises.
    Without ``x`` (the layer, the JAX adapter) the checks against it are
    left out.  Combinations are checked by :func:`resolve`.  ``any_momentum``
    admits any finite momentum (PyTorch's range, for :mod:`fastbn.torch`).
    """
    training = check_flag(training, "training")
    momentum = check_momentum(momentum, any_finite=any_momentum)
    eps = check_eps(eps, allow_zero=x is not None)
    activation = check_activation(activation)
    if residual is not None and x is not None:
        check_like_x(residual, "residual", x)
    renorm = check_renorm(renorm)
    virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    groups = 1 if x is None else ghost_groups(virtual_batch_size, tuple(x.shape), axis)
    return Options(
        training=training,
        momentum=momentum,
        eps=eps,
        activation=activation,
        residual=residual is not None,
        virtual_batch_size=virtual_batch_size,
        groups=groups,
        renorm=renorm,
        collectives=check_process_group(process_group),
    )


#: The smallest eps for batch statistics in float32: 1 / sqrt(eps) of a constant channel (variance 0) must be a
#: float32 number, or invstd is inf and y = 0 * inf NaN where it is 0.  (1 / float32-max)^2, rounded up.
MIN_EPS_FLOAT32 = 8.7e-78


def check_eps_range(eps: float, stats: np.dtype[Any]) -> None:
    """Refuse an eps whose ``1 / sqrt(eps)`` the statistics dtype cannot hold (a variance of 0 may meet it).

    Only float32 has such an eps (below :data:`MIN_EPS_FLOAT32`); float64's
    1 / sqrt(5e-324) is 4.5e161.
    """
    if stats == np.float32 and eps < MIN_EPS_FLOAT32:
        raise ValueError(
            f"eps: expected at least {MIN_EPS_FLOAT32:g} with float32 statistics, so that a constant channel's "
            f"1 / sqrt(eps) is a float32 number (else its output is NaN), got {eps:g}"
        )


def check_batch_eps(eps: float, stats: np.dtype[Any] | None) -> None:
    """The eps of a call that normalises with batch statistics: positive, and (``stats``) in range."""
    if eps == 0:
        raise ValueError(
            "eps: expected a positive float where batch statistics are used (training, or no running "
            "statistics), got 0.0; zero is allowed only when normalising with running statistics"
        )
    if stats is not None:
        check_eps_range(eps, stats)


def resolve(
    opts: Options, shape: tuple[int, ...], axis: int, has_running: bool, stats: np.dtype[Any] | None = None
) -> tuple[bool, int]:
    """Check that the options go together on input of ``shape``; return ``(batch_stats, groups)``.

    ``batch_stats`` is whether batch statistics are used (training, or no
    running statistics); ``groups`` the number of ghost batches (1 without
    them, and whenever the running statistics are used).  ``stats``, the
    statistics dtype: with float32 statistics, batch statistics need an
    eps of at least :data:`MIN_EPS_FLOAT32`.

    Raises
    ------
    ValueError
        For an illegal combination, naming the option; in training, for a
        channel with a single value (per ghost batch), as in PyTorch.
    """
    vbs = opts.virtual_batch_size
    batch_stats = opts.training or not has_running
    groups = opts.groups if batch_stats else 1  # ghost batches only change batch statistics
    count = math.prod(shape) // shape[axis]
    if batch_stats:
        check_batch_eps(opts.eps, stats)
    if opts.collectives is None and opts.training and count // groups == 1:
        where = "" if groups == 1 else f" (in each ghost batch of {vbs})"
        raise ValueError(f"x: Expected more than 1 value per channel when training{where}, got input size {shape}")
    if opts.renorm is not None and vbs is not None:
        raise ValueError("renorm: not supported together with virtual_batch_size")
    if opts.renorm is not None and opts.training and not has_running:
        raise ValueError("renorm: batch renormalization needs running_mean and running_var in training")
    if opts.collectives is not None:
        for name, given in (
            ("activation", opts.activation is not None),
            ("residual", opts.residual),
            ("virtual_batch_size", vbs is not None),
            ("renorm", opts.renorm is not None),
        ):
            if given:
                raise ValueError(f"{name}: not supported together with process_group yet")
    return batch_stats, groups
