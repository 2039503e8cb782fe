"""fastbn's batch norm as PyTorch custom operators: ``torch.ops.fastbn.batch_norm`` and its backward.

Registered with ``torch.library.custom_op``, the two operators are opaque to
torch's compiler stack: Dynamo records a call to them and never traces into
Numba, AOTAutograd and Inductor treat them as external kernels, and
``torch.export`` keeps them as nodes.  What each registration gives:

* the implementations run fastbn's kernels (CPU and, by the same
  registration, CUDA tensors) through :func:`fastbn.forward` and
  :func:`fastbn.backward`;
* ``register_fake`` gives output shapes, dtypes and strides without running
  anything (FakeTensor tracing, dynamic shapes);
* ``register_autograd`` makes the forward differentiable through the
  backward operator, and the backward differentiable through the torch
  formulas of :mod:`fastbn.torch._reference` (double backward);
* ``register_vmap`` runs a batch of independent batch norms
  (``torch.func.vmap``, ``jacrev``) as one, the vmapped dimension folded into
  the channels.

Both operators are functional (torch registers autograd only for those):
the forward reads the running statistics and returns their updated values,
which the caller copies into the buffers (``copy_``: versions bump, and
functionalization keeps the update under torch.compile).  Options are
flattened into schema types: ``virtual_batch_size`` is an optional int,
renorm an optional ``(rmax, dmax)`` pair of floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy.typing as npt
import torch
import torch.autograd.forward_ad as fwAD

import fastbn
from fastbn.torch import _reference
from fastbn.torch._arrays import read_only_stat, small_backward

Tensor = torch.Tensor
#: A tensor, or None for an absent one (a weight, a gradient).
_Maybe = Tensor | None

__all__ = ["backward_op", "forward_op", "gradients", "plain", "run_forward", "stat_shape", "tracked", "write_running"]


def stat_shape(input: Tensor, virtual_batch_size: int | None, batch_stats: bool) -> tuple[int, ...]:
    """Shape of the saved mean and invstd: ``(C,)``, or ``(G, C)`` with ghost batches in use."""
    channels = input.shape[1]
    if virtual_batch_size is not None and batch_stats:
        return (input.shape[0] // virtual_batch_size, channels)
    return (channels,)


def _host_or_device(tensor: Tensor) -> npt.NDArray[Any] | Tensor:
    """A saved tensor as fastbn's backend keeps it: a NumPy view on the CPU, the tensor itself on a GPU."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def _as_tensor(value: Any, like: Tensor) -> Tensor:
    """A fastbn result (NumPy array, device array or tensor) as a tensor on ``like``'s device, no copy."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(value) if like.device.type == "cpu" else torch.as_tensor(value, device=like.device)


def plain(*tensors: _Maybe) -> bool:
    """Whether every given tensor is an ordinary eager tensor (no fake, meta, functorch or subclass wrapper).

    Those run fastbn directly, with no operator dispatch; anything else goes
    through the registered operators, whose fake and vmap rules handle it.
    """
    for tensor in tensors:
        if tensor is None:
            continue
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.is_meta:
            return False
        functorch = torch._C._functorch
        if functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_legacy_batchedtensor(tensor):
            return False
    return True


def tracked(*tensors: _Maybe) -> bool:
    """Whether autograd would record anything: a tensor requires grad (grad mode on) or carries a tangent."""
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is not None and ((grad and tensor.requires_grad) or fwAD.unpack_dual(tensor).tangent is not None):  # type: ignore[no-untyped-call]  # unannotated in torch
            return True
    return False


def run_forward(
    input: Tensor,
    weight: _Maybe,
    bias: _Maybe,
    running_mean: _Maybe,
    running_var: _Maybe,
    residual: _Maybe,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    virtual_batch_size: int | None,
    rmax: float | None,
    dmax: float | None,
    *,
    in_place: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward_op`'s computation; with ``in_place`` the running statistics are updated where they are.

    ``in_place`` serves eager calls on plain tensors, which skip the operator:
    fastbn's kernels then write the buffers directly (their version counters
    bumped, as torch's own update does) and the returned "new" statistics are
    empty: nothing is left to copy.
    """
    batch_stats = training or running_mean is None
    update = training and running_mean is not None
    dtype = _reference.stats_dtype(input.dtype)
    # Placeholders for what a call does not produce: distinct fresh tensors for
    # the operator (its outputs may not alias), one shared one in place.
    empty = _shared_empty(input, dtype) if in_place else input.new_empty(0, dtype=dtype)
    fresh: Callable[[], Tensor] = (lambda: empty) if in_place else empty.clone
    if update and not in_place:
        running_mean, running_var = cast(Tensor, running_mean).clone(), cast(Tensor, running_var).clone()  # both given
        new_mean, new_var = running_mean, running_var
    else:
        new_mean, new_var = empty, fresh()
    if input.numel() == 0:
        zeros = input.new_zeros(stat_shape(input, virtual_batch_size, batch_stats), dtype=dtype)
        return torch.empty_like(input), zeros, zeros.clone(), fresh(), fresh(), new_mean, new_var
    y, saved = fastbn.forward(
        input,
        weight,
        bias,
        running_mean=running_mean if update else read_only_stat(running_mean),
        running_var=running_var if update else read_only_stat(running_var),
        training=training,
        momentum=momentum,
        eps=eps,
        axis=1,
        activation="relu" if relu else None,
        residual=residual,
        virtual_batch_size=virtual_batch_size,
        renorm=None if rmax is None else (rmax, dmax),  # type: ignore[arg-type]  # fastbn.forward checks dmax
        _any_momentum=True,
    )
    if update and in_place:
        assert running_mean is not None and running_var is not None  # update: fastbn.forward took both
        for buffer in (running_mean, running_var):
            if not buffer.is_inference():
                torch.autograd.graph.increment_version(buffer)
    r = fresh() if saved.r is None else _as_tensor(saved.r, input)
    d = fresh() if saved.d is None else _as_tensor(saved.d, input)
    return (
        _as_tensor(y, input),
        _as_tensor(saved.mean, input),
        _as_tensor(saved.invstd, input),
        r,
        d,
        new_mean,
        new_var,
    )


_EMPTY: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _shared_empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """One empty tensor per device and dtype, never written: the placeholder of eager calls."""
    key = (like.device, dtype)
    empty = _EMPTY.get(key)
    if empty is None:
        empty = _EMPTY[key] = torch.empty(0, dtype=dtype, device=like.device)
    return empty


@torch.library.custom_op("fastbn::batch_norm", mutates_args=())
def forward_op(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    virtual_batch_size: int | None,
    rmax: float | None,
    dmax: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch norm over dimension 1: ``(output, saved_mean, saved_invstd, r, d, new_running_mean, new_running_var)``.

    The arguments are those of :func:`fastbn.forward` (channel axis 1); the
    running statistics are read, never written.  ``r`` and ``d`` are renorm's
    per-channel constants, empty without renorm; the new running statistics
    are the updated values in training (empty otherwise), computed by
    fastbn's kernels into copies.  An empty input gives an empty output and
    running statistics unchanged, as in torch; its saved statistics are zeros.
    """
    return run_forward(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training,
        momentum,
        eps,
        relu,
        virtual_batch_size,
        rmax,
        dmax,
    )


@forward_op.register_fake
def _forward_fake(  # type: ignore[no-untyped-def]  # torch.library's fake rule
    input,
    weight,
    bias,
    running_mean,
    running_var,
    residual,
    training,
    momentum,
    eps,
    relu,
    virtual_batch_size,
    rmax,
    dmax,
):
    batch_stats = training or running_mean is None
    dtype = _reference.stats_dtype(input.dtype)
    stats = input.new_empty(stat_shape(input, virtual_batch_size, batch_stats), dtype=dtype)
    update = training and running_mean is not None
    renorm = rmax is not None and update and input.numel() > 0
    channels = input.shape[1] if renorm else 0
    running = input.shape[1] if update else 0
    running_dtype = running_mean.dtype if update else dtype
    return (
        torch.empty_like(input),
        stats,
        torch.empty_like(stats),
        input.new_empty(channels, dtype=dtype),
        input.new_empty(channels, dtype=dtype),
        input.new_empty(running, dtype=running_dtype),
        input.new_empty(running, dtype=running_dtype),
    )


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def backward_op(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    saved_mean: Tensor,
    saved_invstd: Tensor,
    r: Tensor,
    d: Tensor,
    output: Tensor | None,
    batch_stats: bool,
    residual: bool,
    virtual_batch_size: int | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dresidual)`` of :func:`forward_op`, by :func:`fastbn.backward`.

    ``output`` is the forward's output where it applied a ReLU (the mask),
    else None; ``dresidual`` is empty without a residual.  ``eps`` is not
    needed here, only by this operator's own derivative (double backward).
    """
    return _run_backward(
        grad_out, input, weight, saved_mean, saved_invstd, r, d, output, batch_stats, residual, virtual_batch_size, eps
    )


def _run_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: _Maybe,
    saved_mean: Tensor,
    saved_invstd: Tensor,
    r: Tensor,
    d: Tensor,
    output: _Maybe,
    batch_stats: bool,
    residual: bool,
    virtual_batch_size: int | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = _reference.stats_dtype(input.dtype)
    channels = input.shape[1]
    if input.numel() == 0:
        zeros = input.new_zeros(channels, dtype=dtype)
        dres = torch.empty_like(input) if residual else input.new_empty(0)
        return torch.empty_like(input), zeros, zeros.clone(), dres
    groups = saved_mean.shape[0] if saved_mean.dim() == 2 else 1
    if batch_stats and not residual and output is None and groups == 1 and not r.numel():
        small = small_backward(grad_out, input, weight, saved_mean, saved_invstd)
        if small is not None:
            return small
    saved = fastbn.Saved(
        mean=_host_or_device(saved_mean),
        invstd=_host_or_device(saved_invstd),
        batch_stats=batch_stats,
        count=input.numel() // channels // groups,
        shape=tuple(input.shape),
        axis=1,
        process_group=None,
        activation=None if output is None else "relu",
        residual=residual,
        virtual_batch_size=virtual_batch_size if groups > 1 else None,
        r=_host_or_device(r) if r.numel() else None,
        d=_host_or_device(d) if d.numel() else None,
    )
    grads = fastbn.backward(grad_out, input, weight, saved, axis=1, y=output)
    dx, dweight, dbias = (_as_tensor(g, input) for g in grads[:3])
    dres = _as_tensor(grads[3], input) if residual else input.new_empty(0)
    return dx, dweight, dbias, dres


@backward_op.register_fake
def _backward_fake(  # type: ignore[no-untyped-def]  # torch.library's fake rule
    grad_out, input, weight, saved_mean, saved_invstd, r, d, output, batch_stats, residual, virtual_batch_size, eps
):
    dtype = _reference.stats_dtype(input.dtype)
    channels = input.shape[1]
    dres = torch.empty_like(input) if residual else input.new_empty(0)
    return torch.empty_like(input), input.new_empty(channels, dtype=dtype), input.new_empty(channels, dtype=dtype), dres


# ----------------------------------------------------------------- autograd ---
def _setup_forward(ctx, inputs, output):  # type: ignore[no-untyped-def]  # torch.library's autograd rule
    (
        input,
        weight,
        _bias,
        running_mean,
        _running_var,
        residual,
        training,
        _momentum,
        eps,
        relu,
        virtual_batch_size,
        _rmax,
        _dmax,
    ) = inputs
    y, saved_mean, saved_invstd, r, d, _new_mean, _new_var = output
    ctx.save_for_backward(input, weight, saved_mean, saved_invstd, r, d, y if relu else None)
    ctx.options = (training or running_mean is None, residual is not None, virtual_batch_size, eps)


def gradients(ctx: Any, grad_y: _Maybe, residual_index: int = 5) -> tuple[_Maybe, _Maybe, _Maybe, _Maybe]:
    """The forward operator's input gradients from what :func:`_setup_forward` saved.

    Shared by the operator's autograd registration and the eager
    ``autograd.Function`` of :mod:`fastbn.torch._functional`, so both
    differentiate the same way.  Returns ``(dx, dweight, dbias, dresidual)``,
    None for what ``ctx.needs_input_grad`` does not ask for (positions 0, 1,
    2 of the inputs, and ``residual_index``: 5 in the operator's schema).
    """
    input, weight, saved_mean, saved_invstd, r, d, y = ctx.saved_tensors
    batch_stats, residual, virtual_batch_size, eps = ctx.options
    if grad_y is None:
        grad_y = torch.zeros_like(input)
    options = (batch_stats, residual, virtual_batch_size, eps)
    if torch.compiler.is_compiling():
        grads = backward_op(grad_y, input, weight, saved_mean, saved_invstd, r, d, y, *options)
    elif plain(grad_y, input, weight, saved_mean, y):
        if tracked(grad_y, input, weight):  # create_graph, or forward-mode over the backward
            grads = _EagerBackward.apply(grad_y, input, weight, saved_mean, saved_invstd, r, d, y, *options)  # type: ignore[no-untyped-call]  # unannotated in torch
        else:
            grads = _run_backward(grad_y, input, weight, saved_mean, saved_invstd, r, d, y, *options)
    else:
        grads = _Backward.apply(grad_y, input, weight, saved_mean, saved_invstd, r, d, y, *options)  # type: ignore[no-untyped-call]  # as above
    dx, dweight, dbias, dres = grads
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dweight if need[1] and weight is not None else None,
        dbias if need[2] else None,
        dres if residual and need[residual_index] else None,
    )


def _backward(ctx, grad_y, *_grad_statistics):  # type: ignore[no-untyped-def]  # torch.library's autograd rule
    dx, dweight, dbias, dres = gradients(ctx, grad_y)
    return dx, dweight, dbias, None, None, dres, None, None, None, None, None, None, None


def _setup_backward(ctx, inputs, output):  # type: ignore[no-untyped-def]  # torch.library's autograd rule
    (grad_out, input, weight, saved_mean, saved_invstd, r, d, y, batch_stats, residual, virtual_batch_size, eps) = (
        inputs
    )
    ctx.save_for_backward(grad_out, input, weight, saved_mean, saved_invstd, r, d, y)
    ctx.options = (batch_stats, residual, virtual_batch_size, eps)


def _first_order(
    saved: Sequence[Any], options: Sequence[Any]
) -> Callable[[Tensor, Tensor, _Maybe], tuple[Tensor, Tensor, Tensor, _Maybe]]:
    """The backward as a torch function of ``(grad_out, input, weight)`` (:func:`_reference.backward`).

    It recomputes the batch statistics from ``input``, so its derivatives
    are exact, the statistics' dependence on ``input`` included.  The
    residual's gradient is zeros where there is none (a fixed output count).
    """
    _grad_out, _input, _weight, saved_mean, saved_invstd, r, d, y = saved
    batch_stats, residual, _virtual_batch_size, eps = options
    groups = saved_mean.shape[0] if saved_mean.dim() == 2 else 1

    def first_order(grad_out: Tensor, input: Tensor, weight: _Maybe) -> tuple[Tensor, Tensor, Tensor, _Maybe]:
        dx, dweight, dbias, dres = _reference.backward(
            grad_out,
            input,
            weight,
            saved_mean,
            saved_invstd,
            r,
            d,
            y,
            batch_stats=batch_stats,
            eps=eps,
            groups=groups,
            residual=residual,
        )
        return dx, dweight, dbias, (dres if residual else torch.zeros_like(dx))

    return first_order


def _zeros_for_missing(grads: Sequence[_Maybe], input: Tensor) -> tuple[Tensor, ...]:
    """The incoming gradients of ``(dx, dweight, dbias, dresidual)``, zeros where absent (or an empty dresidual)."""
    channels = input.shape[1]
    likes = (input, None, None, input)
    dtype = _reference.stats_dtype(input.dtype)
    filled: list[Tensor] = []
    for grad, like in zip(grads, likes):
        expected = like.shape if like is not None else (channels,)
        if grad is None or tuple(grad.shape) != tuple(expected):
            grad = torch.zeros_like(like) if like is not None else input.new_zeros(channels, dtype=dtype)
        filled.append(grad)
    return tuple(filled)


def _second_order(saved: Sequence[Any], options: Sequence[Any], grads: Sequence[_Maybe]) -> tuple[_Maybe, ...]:
    """The vector-Jacobian product of the backward: gradients of ``(grad_out, input, weight)``."""
    grad_out, input, weight = saved[:3]
    first_order = _first_order(saved, options)
    cotangents = _zeros_for_missing(grads, input)
    if weight is None:
        _, vjp = cast(
            "tuple[Any, Callable[..., tuple[Tensor, ...]]]",
            torch.func.vjp(lambda g, x: first_order(g, x, None), grad_out, input),
        )
        return (*vjp(cotangents), None)
    _, vjp = cast("tuple[Any, Callable[..., tuple[Tensor, ...]]]", torch.func.vjp(first_order, grad_out, input, weight))
    return vjp(cotangents)


def _double_backward(ctx, grad_dx, grad_dweight, grad_dbias, grad_dres):  # type: ignore[no-untyped-def]  # torch.library's autograd rule
    g_grad_out, g_input, g_weight = _second_order(
        ctx.saved_tensors, ctx.options, (grad_dx, grad_dweight, grad_dbias, grad_dres)
    )
    return g_grad_out, g_input, g_weight, None, None, None, None, None, None, None, None, None


def _jvp_by_vjp(
    function: Callable[..., tuple[_Maybe, ...]], primals: Sequence[Tensor], tangents: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``J @ tangents`` of ``function`` at ``primals``, by two reverse-mode products.

    Inside a ``jvp`` torch does not nest forward-mode AD, so the Jacobian-vector
    product is taken as the vjp of the (linear) map ``u -> J^T u``: its
    transpose is ``J``.  Exact, since ``function`` is twice differentiable.
    """
    outputs, vjp = cast("tuple[tuple[Tensor, ...], Callable[..., Any]]", torch.func.vjp(function, *primals))
    _, transpose = cast(
        "tuple[Any, Callable[..., tuple[Tensor, ...]]]",
        torch.func.vjp(lambda *u: vjp(u), *(torch.zeros_like(out) for out in outputs)),
    )
    return transpose(tuple(tangents))


class _Backward(torch.autograd.Function):
    """The backward operator in eager mode, differentiable again in both modes and under ``torch.func``.

    The operator's own autograd registration serves torch.compile; under
    torch.func transforms and forward-mode AD, torch needs an
    ``autograd.Function`` with ``setup_context`` and ``jvp``, which this is.
    Both differentiate :func:`_first_order`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, input, weight, saved_mean, saved_invstd, r, d, y, *options):  # type: ignore[no-untyped-def]  # autograd.Function's, called by torch
        if plain(grad_out, input, weight, saved_mean, y):
            return _run_backward(grad_out, input, weight, saved_mean, saved_invstd, r, d, y, *options)
        return backward_op(grad_out, input, weight, saved_mean, saved_invstd, r, d, y, *options)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        saved, options = inputs[:8], inputs[8:]
        if not options[1]:  # no residual: dresidual is an empty placeholder
            ctx.mark_non_differentiable(output[3])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.options = options

    @staticmethod
    def backward(ctx, grad_dx, grad_dweight, grad_dbias, grad_dres):  # type: ignore[no-untyped-def]  # autograd.Function's, called by torch
        g_grad_out, g_input, g_weight = _second_order(
            ctx.saved_tensors, ctx.options, (grad_dx, grad_dweight, grad_dbias, grad_dres)
        )
        return g_grad_out, g_input, g_weight, None, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_grad_out, t_input, t_weight, *_unused):  # type: ignore[no-untyped-def]  # autograd.Function's, called by torch
        saved = ctx.saved_tensors
        grad_out, input, weight = saved[:3]
        first_order = _first_order(saved, ctx.options)
        t_grad_out = torch.zeros_like(grad_out) if t_grad_out is None else t_grad_out
        t_input = torch.zeros_like(input) if t_input is None else t_input
        if weight is None:
            tangents = _jvp_by_vjp(lambda g, x: first_order(g, x, None), (grad_out, input), (t_grad_out, t_input))
        else:
            t_weight = torch.zeros_like(weight) if t_weight is None else t_weight
            tangents = _jvp_by_vjp(first_order, (grad_out, input, weight), (t_grad_out, t_input, t_weight))
        residual = ctx.options[1]
        return (*tangents[:3], tangents[3] if residual else None)


forward_op.register_autograd(_backward, setup_context=_setup_forward)
backward_op.register_autograd(_double_backward, setup_context=_setup_backward)


class _EagerBackward(torch.autograd.Function):
    """:class:`_Backward` for plain eager tensors, in the ``forward(ctx, ...)`` form (no per-call ``inspect``)."""

    @staticmethod
    def forward(ctx, grad_out, input, weight, saved_mean, saved_invstd, r, d, y, *options):  # type: ignore[no-untyped-def]  # autograd.Function's, called by torch
        inputs = (grad_out, input, weight, saved_mean, saved_invstd, r, d, y, *options)
        output = _run_backward(*inputs)
        _Backward.setup_context(ctx, inputs, output)
        return output

    backward = _Backward.backward
    jvp = _Backward.jvp


# --------------------------------------------------------------------- vmap ---
# vmap over batch norm is a batch of B independent batch norms: the vmapped
# dimension joins the channels, (N, C, ...) -> (N, B*C, ...), and one call
# computes them all (channels are independent in every formula).  Unbatched
# arguments are broadcast over B; results are unfolded again.


def _batched_first(tensor: Tensor, dim: int | None, size: int) -> Tensor:
    """``tensor`` with the vmapped dimension first (broadcast there if it has none)."""
    if dim is None:
        return tensor.unsqueeze(0).expand((size, *tuple(tensor.shape)))
    return tensor.movedim(dim, 0)


def _fold_data(tensor: _Maybe, dim: int | None, size: int) -> _Maybe:
    """``(N, C, ...)`` per vmapped item as ``(N, B*C, ...)``."""
    if tensor is None:
        return None
    folded = _batched_first(tensor, dim, size).movedim(0, 1)
    return folded.reshape((folded.shape[0], -1, *tuple(folded.shape[3:])))


def _fold_channels(tensor: _Maybe, dim: int | None, size: int) -> _Maybe:
    """``(C,)`` or ``(G, C)`` per vmapped item as ``(B*C,)`` or ``(G, B*C)``; empty stays empty."""
    if tensor is None or (dim is None and tensor.numel() == 0):
        return tensor
    folded = _batched_first(tensor, dim, size)
    if folded.dim() == 3:  # (B, G, C): ghost batches' statistics
        return folded.movedim(0, 1).reshape(folded.shape[1], -1).contiguous()
    # contiguous: with one channel the reshape of a broadcast is a stride-0 view.
    return folded.reshape(-1).contiguous()


def _unfold_data(tensor: Tensor, size: int) -> tuple[Tensor, int | None]:
    return tensor.reshape((tensor.shape[0], size, tensor.shape[1] // size, *tuple(tensor.shape[2:]))), 1


def _unfold_channels(tensor: Tensor, size: int) -> tuple[Tensor, int | None]:
    if tensor.numel() == 0:
        return tensor, None
    if tensor.dim() == 2:  # (G, B*C)
        return tensor.reshape(tensor.shape[0], size, tensor.shape[1] // size), 1
    return tensor.reshape(size, tensor.shape[0] // size), 0


@forward_op.register_vmap
def _forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var, residual, *options):  # type: ignore[no-untyped-def]  # torch.library's vmap rule
    size = info.batch_size
    dims = iter(in_dims)
    input, weight, bias, running_mean, running_var, residual = (
        fold(value, next(dims), size)
        for fold, value in (
            (_fold_data, input),
            (_fold_channels, weight),
            (_fold_channels, bias),
            (_fold_channels, running_mean),
            (_fold_channels, running_var),
            (_fold_data, residual),
        )
    )
    outputs = forward_op(input, weight, bias, running_mean, running_var, residual, *options)
    unfolded = [_unfold_data(outputs[0], size)] + [_unfold_channels(t, size) for t in outputs[1:]]
    for position, running_dim in ((5, in_dims[3]), (6, in_dims[4])):
        # A new running statistic depends only on the input and its old value:
        # with neither vmapped it is the same for every item (torch's rule),
        # even where weight, bias, residual or the other statistic are.
        tensor, dim = unfolded[position]
        if in_dims[0] is None and running_dim is None and dim is not None:
            unfolded[position] = (tensor.select(dim, 0), None)
    return tuple(t for t, _ in unfolded), tuple(d for _, d in unfolded)


@backward_op.register_vmap
def _backward_vmap(info, in_dims, grad_out, input, weight, saved_mean, saved_invstd, r, d, output, *options):  # type: ignore[no-untyped-def]  # torch.library's vmap rule
    size = info.batch_size
    dims = iter(in_dims)
    grad_out, input, weight, saved_mean, saved_invstd, r, d, output = (
        fold(value, next(dims), size)
        for fold, value in (
            (_fold_data, grad_out),
            (_fold_data, input),
            (_fold_channels, weight),
            (_fold_channels, saved_mean),
            (_fold_channels, saved_invstd),
            (_fold_channels, r),
            (_fold_channels, d),
            (_fold_data, output),
        )
    )
    dx, dweight, dbias, dres = backward_op(grad_out, input, weight, saved_mean, saved_invstd, r, d, output, *options)
    unfolded = [
        _unfold_data(dx, size),
        _unfold_channels(dweight, size),
        _unfold_channels(dbias, size),
        _unfold_data(dres, size) if dres.numel() else (dres, None),
    ]
    return tuple(t for t, _ in unfolded), tuple(d for _, d in unfolded)


# --------------------------------------------------- running statistics ---
@torch.library.custom_op("fastbn::write_running", mutates_args=("running_mean", "running_var"))
def write_running(running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor) -> None:
    """Write the forward operator's new running statistics into the buffers, in place.

    An operator of its own, as torch's batch norm updates its buffers inside
    its kernel: under ``torch.func`` transforms and tensor subclasses the
    write then happens on the plain tensors, where a ``copy_`` in Python
    would be refused as a mutation of a captured tensor.
    """
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


@write_running.register_fake
def _write_running_fake(running_mean, running_var, new_mean, new_var):  # type: ignore[no-untyped-def]  # torch.library's fake rule
    return None


@write_running.register_vmap
def _write_running_vmap(info, in_dims, running_mean, running_var, new_mean, new_var):  # type: ignore[no-untyped-def]  # torch.library's vmap rule
    size = info.batch_size
    targets: list[tuple[Tensor, Tensor]] = []
    for buffer, buffer_dim, value, value_dim in (
        (running_mean, in_dims[0], new_mean, in_dims[2]),
        (running_var, in_dims[1], new_var, in_dims[3]),
    ):
        if buffer_dim is None and value_dim is not None:
            raise RuntimeError(
                "running_mean: Batch norm got a batched tensor as input while the running_mean or running_var, "
                "which will be updated in place, were not batched; vmap over them too, or leave them None"
            )
        if buffer_dim is None:
            targets.append((buffer, value))
        else:
            targets.append((buffer.movedim(buffer_dim, 0), _batched_first(value, value_dim, size)))
    # The write itself one level down, through the operator again (not a copy_ here, which an
    # enclosing grad transform refuses as a mutation of a captured tensor: vjp of a vmap).
    (mean_target, mean_value), (var_target, var_value) = targets
    write_running(mean_target, var_target, mean_value.detach(), var_value.detach())
    return None, None
