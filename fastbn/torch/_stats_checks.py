"""The argument checks of :mod:`fastbn.torch._stats` (kept apart for its length): all run before any operator."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from fastbn.torch._checks import FLOATS, BatchNormError, BatchNormIndexError, BatchNormTypeError

Tensor = torch.Tensor


def _check_input(input: Any, function: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise BatchNormTypeError(f"input: {function}(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dtype not in FLOATS:
        raise BatchNormTypeError(f"input: expected a float16, bfloat16, float32 or float64 tensor, got {input.dtype}")


def _check_axis(value: Any, ndim: int, name: str) -> int:
    """``value`` as a non-negative dimension of an ``ndim``-D tensor, with torch's "Dimension out of range"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BatchNormTypeError(f"{name}: expected an int, got {type(value).__name__}")
    axis = int(value)
    if not -ndim <= axis < ndim:
        raise BatchNormIndexError(
            f"{name}: Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {axis})"
        )
    return axis % ndim


def _check_tensor(value: Any, name: str, input: Tensor, dtypes: tuple[torch.dtype, ...], expected: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise BatchNormTypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise BatchNormTypeError(f"{name}: expected {expected} tensor, got {value.dtype}")
    if value.device != input.device:
        raise BatchNormError(
            f"{name}: is on {value.device}, but input is on {input.device}; expected all tensors to be on the "
            "same device"
        )


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (torch's rule) without changing it."""
    if len(shape) > len(target):
        return False
    return all(size == 1 or size == goal for size, goal in zip(reversed(shape), reversed(target)))


def _reduction_axes(input: Tensor, dim: Any, axes: Any) -> tuple[list[int], int | None]:
    """``(axes, channel)``: the sorted reduction axes, and the channel dimension in the channel form (else None)."""
    ndim = input.dim()
    if dim is not None and axes is not None:
        raise BatchNormError(
            f"dim: give the channel dimension (dim, kept) or the reduced dimensions (axes), not both; got dim={dim!r} "
            f"and axes={axes!r}"
        )
    if axes is None:
        channel = _check_axis(1 if dim is None else dim, ndim, "dim")
        return [axis for axis in range(ndim) if axis != channel], channel
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    if not isinstance(axes, Sequence) or isinstance(axes, str):
        raise BatchNormTypeError(f"axes: expected an int or a sequence of ints, got {type(axes).__name__}")
    if len(axes) == 0:
        # torch.var_mean(dim=[]) reduces every dimension, tf.nn.moments(axes=[]) none: refused as ambiguous.
        raise BatchNormError("axes: expected at least one dimension to reduce, got an empty sequence")
    reduced: list[int] = []
    for value in axes:
        axis = _check_axis(value, ndim, "axes")
        if axis in reduced:
            raise BatchNormError(f"axes: dim {axis} appears multiple times in the list of dims")
        reduced.append(axis)
    return sorted(reduced), None


def _moments_weights(
    input: Tensor, weights: Any, mask: Any, channel: int | None
) -> tuple[Tensor | None, Tensor | None]:
    """``weights`` and ``mask`` checked, the mask of the channel form (input's shape less ``dim``) unsqueezed."""
    if weights is not None and mask is not None:
        raise BatchNormError("mask: give weights or mask, not both (a mask is weights of 0 and 1)")
    shape = tuple(input.shape)
    if weights is not None:
        _check_tensor(weights, "weights", input, FLOATS, "a float16, bfloat16, float32 or float64")
        if not _broadcasts(weights.shape, shape):
            raise BatchNormError(
                f"weights: expected a shape broadcastable to input's {shape}, got {tuple(weights.shape)}"
            )
    if mask is not None:
        _check_tensor(mask, "mask", input, (torch.bool,), "a bool")
        if channel is not None and mask.dim() == input.dim() - 1:
            # Keras's form (as fastbn.moments reads it): input's shape without the channel dimension.
            without = shape[:channel] + shape[channel + 1 :]
            if not _broadcasts(mask.shape, without):
                raise BatchNormError(
                    f"mask: expected a shape broadcastable to input's {shape}, or of rank {len(without)} to its "
                    f"shape without dim {channel}, {without}; got {tuple(mask.shape)}"
                )
            mask = mask.unsqueeze(channel)
        elif not _broadcasts(mask.shape, shape):
            raise BatchNormError(f"mask: expected a shape broadcastable to input's {shape}, got {tuple(mask.shape)}")
    return weights, mask


def _channel_dim(input: Tensor, parameters: Sequence[tuple[str, Tensor | None]], dim: Any) -> int:
    """The channel dimension: ``dim``, else the one along which a parameter of rank >= 2 varies, else 1."""
    ndim = input.dim()
    if dim is not None:
        return _check_axis(dim, ndim, "dim")
    for _name, value in parameters:
        if value is not None and 2 <= value.dim() <= ndim:
            varying = [ndim - value.dim() + i for i, size in enumerate(value.shape) if size != 1]
            if len(varying) == 1:
                return varying[0]
    return _check_axis(1, ndim, "dim")


def _as_channel_vector(value: Tensor, name: str, input: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """A parameter (``(C,)``, one element, or varying along ``dim`` only) as ``(C,)`` in ``dtype``, differentiably."""
    channels = input.shape[dim]
    shape, ndim = tuple(value.shape), input.dim()
    if value.dim() <= 1:
        # (Explicit comparisons: under Dynamo, ``size in (channels, 1)`` can be
        # False for a symbolic channel count equal to ``size``.)
        fits = value.numel() == channels or value.numel() == 1
    else:
        pad = ndim - value.dim()
        fits = value.dim() <= ndim and all(
            size == 1 or (pad + i == dim and size == channels) for i, size in enumerate(shape)
        )
    if not fits:
        example = tuple(channels if axis == dim else 1 for axis in range(ndim))
        raise BatchNormError(
            f"{name}: expected shape ({channels},) or one broadcastable to input's {tuple(input.shape)} along dim "
            f"{dim} only, such as {example}; got {shape}"
        )
    vector = value.to(dtype).reshape(-1)
    if vector.numel() != channels:
        vector = vector.expand(channels)
    return vector.contiguous()  # C elements; fastbn's CUDA backend takes dense (C,) vectors only
