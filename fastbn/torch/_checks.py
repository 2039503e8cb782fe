"""Argument checks with torch's exception types and messages, before anything runs.

``torch.nn.functional.batch_norm`` raises ``RuntimeError`` for a size or
dtype mismatch and ``ValueError`` for a bad eps or a single value per
channel; fastbn's array API raises ``ValueError`` and ``TypeError``.  The
exceptions here derive from both, so code written for either catches them,
and their messages contain torch's text after the argument's name.

The checks read only shapes, dtypes and devices, so they hold the same in
eager mode and while torch.compile traces with fake tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import cast

import torch
import torch.autograd.forward_ad as fwAD

__all__ = [
    "BatchNormError",
    "BatchNormIndexError",
    "BatchNormTypeError",
    "channels_of",
    "check_arguments",
    "check_not_dual",
    "parameter_dtypes",
]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCED = (torch.float16, torch.bfloat16)


class BatchNormError(ValueError, RuntimeError):
    """An invalid argument: a ``ValueError`` by fastbn's contract, a ``RuntimeError`` by torch's."""


class BatchNormTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype: a ``TypeError`` by fastbn's contract, a ``RuntimeError`` by torch's."""


class BatchNormIndexError(IndexError, ValueError):
    """Non-empty 1-D input: torch's "Dimension out of range" (an ``IndexError``), and a ``ValueError`` by fastbn's."""


def parameter_dtypes(input_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes torch's CPU batch norm takes for parameters and running statistics of ``input_dtype`` input."""
    return (input_dtype, torch.float32) if input_dtype in REDUCED else (input_dtype,)


def channels_of(input: torch.Tensor) -> int:
    """The channel count torch reads: ``input.shape[1]``, and 0 for 1-D input (whose only legal form is empty)."""
    return input.shape[1] if input.dim() >= 2 else 0


def _check_types(input: object, tensors: Iterable[tuple[str, object]]) -> None:
    if not isinstance(input, torch.Tensor):
        kind = type(input)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise BatchNormTypeError(f"input: batch_norm(): argument 'input' (position 1) must be Tensor, not {name}")
    if input.dtype not in FLOATS:
        raise BatchNormTypeError(f"input: expected a float16, bfloat16, float32 or float64 tensor, got {input.dtype}")
    for name, value in tensors:
        if value is not None and not isinstance(value, torch.Tensor):
            raise BatchNormTypeError(f"{name}: expected a torch.Tensor or None, got {type(value).__name__}")


def _check_scalars(training: bool, momentum: object, eps: object) -> None:
    if not isinstance(training, bool):  # torch's rule: a str, a number or a tensor would pick a mode by truthiness
        raise BatchNormTypeError(
            f"training: batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}"
        )
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument or module
    # attribute is a symbolic float, which math.isfinite breaks the graph on.  NaN fails both.
    if (
        not isinstance(momentum, numbers.Real)
        or isinstance(momentum, bool)
        or not -math.inf < cast(float, momentum) < math.inf
    ):
        raise BatchNormTypeError(f"momentum: expected a finite float, got {momentum!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not -math.inf < cast(float, eps) < math.inf:
        raise BatchNormTypeError(f"eps: expected a finite float, got {eps!r}")
    if training and eps <= 0:
        raise BatchNormError(f"eps: batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise BatchNormError(f"eps: batch_norm eps must be non-negative, but got {eps}")


# torch's names of the dtypes, as its kernels' dtype errors spell them.
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def _check_dtypes(input: torch.Tensor, parameters: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    # torch's CPU kernel: parameters and running statistics all in the input's
    # dtype, or (for float16/bfloat16 input) all in float32.  An empty input
    # never reaches the kernel, so torch takes any dtypes then.
    given = [(name, value) for name, value in parameters if value is not None]
    allowed = parameter_dtypes(input.dtype)
    # The argument to blame: the first of a dtype torch refuses here, else (all allowed, but mixed) the first
    # that differs from the first one given.
    for name, value in given:
        if value.dtype not in allowed or value.dtype != given[0][1].dtype:
            expected = given[0][1].dtype if given[0][1].dtype in allowed else allowed[0]
            raise BatchNormTypeError(
                f"{name}: mixed dtype (CPU): all inputs must share same datatype; got {value.dtype} for "
                f"{input.dtype} input (expected all of running_mean, running_var, weight, bias in "
                f"{' or all in '.join(str(t) for t in allowed)}; torch: expected scalar type "
                f"{_SCALAR_NAMES.get(expected, expected)} but found {_SCALAR_NAMES.get(value.dtype, value.dtype)})"
            )


def check_arguments(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    """Check a batch-norm call as torch does, in torch's order and with its exception types, before anything runs.

    Raises
    ------
    BatchNormTypeError
        A non-tensor argument, a dtype fastbn has no kernel for, or mixed
        dtypes torch refuses ("mixed dtype (CPU)").
    BatchNormError
        In torch's order: a single value per channel in training; eps not
        positive in training (or negative in eval); running statistics
        missing in eval, or only one of them given; a size mismatch (torch's
        "should contain C elements"); a tensor on another device; a bad
        residual; a non-finite momentum.
    BatchNormIndexError
        Non-empty 1-D input, which torch cannot index a channel of.
    """
    parameters = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    _check_types(input, (*parameters, ("residual", residual)))
    if training and math.prod(input.shape[:1] + input.shape[2:]) == 1:
        raise BatchNormError(
            f"input: Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    _check_scalars(training, momentum, eps)
    if not training and running_mean is None:
        raise BatchNormError("running_mean: running_mean must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        name = "running_var" if running_var is None else "running_mean"
        raise BatchNormError(f"{name}: running_mean and running_var must either both be None or neither be None")
    channels = channels_of(input)
    for name, value in parameters:
        if value is not None and value.numel() != channels:
            raise BatchNormError(f"{name} should contain {channels} elements not {value.numel()}")
    if input.dim() < 2 and input.numel() > 0:
        raise BatchNormIndexError(
            f"input: Dimension out of range (expected to be in range of [-1, 0], but got 1): "
            f"batch norm needs the channels at dimension 1 (got {input.dim()}D input)"
        )
    for name, value in (*parameters, ("residual", residual)):
        if value is not None and value.device != input.device:
            raise BatchNormError(
                f"{name}: is on {value.device}, but input is on {input.device}; expected all "
                "tensors to be on the same device"
            )
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        raise BatchNormError(
            f"residual: expected input's shape {tuple(input.shape)} and dtype {input.dtype}, got "
            f"{tuple(residual.shape)} and {residual.dtype}"
        )
    if input.numel() > 0:
        _check_dtypes(input, parameters)


def check_not_dual(
    input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool
) -> None:
    """Refuse running statistics that require grad, or carry a tangent where it would count, as torch does.

    They are state that batch norm updates, never differentiable inputs: torch
    refuses them when they require grad, and, in eval (where the output
    depends on them), when they carry a forward-mode tangent while the input
    does too.  (Not checked while torch.compile traces: it has no duals.)
    """
    if torch.compiler.is_compiling():
        return
    dual_input = not training and input.numel() > 0 and fwAD.unpack_dual(input).tangent is not None  # type: ignore[no-untyped-call]  # unannotated in torch
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            continue
        if value.requires_grad and torch.is_grad_enabled():
            raise BatchNormError(
                f"{name}: The function 'batch_norm' is not differentiable with respect to argument "
                f"'{name}'. This input cannot have requires_grad True."
            )
        if dual_input and fwAD.unpack_dual(value).tangent is not None:  # type: ignore[no-untyped-call]  # as above
            raise BatchNormError(
                f"{name}: batch_norm is not differentiable wrt running_mean and running_var, "
                "they cannot have forward grad defined"
            )
