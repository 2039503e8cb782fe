"""PyTorch adapter: fastbn's kernels behind torch's batch-norm API and autograd.

* :func:`batch_norm` has the signature and semantics of
  ``torch.nn.functional.batch_norm`` and is differentiable, through a
  ``torch.autograd.Function`` whose backward is :func:`fastbn.backward`.
* :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are
  drop-in ``torch.nn`` modules: they subclass ``torch.nn.BatchNorm*d``, so the
  constructor, parameters, buffers, ``state_dict``, ``repr`` and input checks
  are torch's own, and only ``forward`` runs on fastbn.
* :func:`convert` swaps every ``torch.nn.BatchNorm*d`` in a model for these.
* :class:`SyncBatchNorm` is a drop-in ``torch.nn.SyncBatchNorm`` (with
  ``convert_sync_batchnorm``): statistics of the global batch over a
  torch.distributed process group, through :func:`fastbn.forward`'s
  ``process_group``.  It runs on CPU tensors (gloo) too, which torch's does not.

CPU tensors run on fastbn's CPU kernels without a copy (NumPy views of the
tensors' memory, channels_last included); CUDA tensors go, through the same
:func:`fastbn.forward` / :func:`fastbn.backward`, to fastbn's CUDA backend.

Importing this module imports torch; ``import fastbn`` alone never does.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

import fastbn

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert"]


def _detached(tensor):
    # fastbn reads tensors through NumPy views or __cuda_array_interface__,
    # both of which torch refuses for tensors that require grad.
    return None if tensor is None else tensor.detach()


def _as_tensor(result, like):
    """A fastbn result as a torch tensor on ``like``'s device, without a copy.

    On the CPU fastbn already hands back tensors (views of its NumPy
    results); a GPU array from the CUDA backend is wrapped through its
    ``__cuda_array_interface__``.
    """
    if isinstance(result, torch.Tensor):
        return result
    return torch.as_tensor(result, device=like.device)


def _bump_version(tensor):
    # fastbn writes running statistics through a view torch cannot see, so
    # tell autograd, as torch's own in-place update would: a graph that saved
    # the old values then fails loudly instead of using the new ones.
    increment_version = getattr(torch.autograd.graph, "increment_version", None)
    if increment_version is not None and not tensor.is_inference():
        increment_version(tensor)


class _BatchNormFunction(torch.autograd.Function):
    """Batch norm whose forward is fastbn.forward and backward fastbn.backward.

    The running statistics arrive packed in one tuple, which autograd does
    not track: they are state, updated in place, not differentiable inputs
    (as in torch, whose running statistics have no gradient).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running, training, momentum, eps, process_group):
        running_mean, running_var = running
        y, saved = fastbn.forward(
            input.detach(),
            _detached(weight),
            _detached(bias),
            running_mean=_detached(running_mean),
            running_var=_detached(running_var),
            training=training,
            momentum=momentum,
            eps=eps,
            axis=1,
            process_group=process_group,
        )
        if training and running_mean is not None:
            _bump_version(running_mean)
            _bump_version(running_var)
        # save_for_backward checks x's version at backward: modifying x in
        # place in between is an error, not a wrong gradient.
        ctx.save_for_backward(input, weight)
        # mean and invstd (fastbn.Saved): per-channel arrays of the backend.
        ctx.fastbn_saved = saved
        return _as_tensor(y, input)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        # fastbn computes the three gradients in one fused pass; those not
        # asked for are dropped here.  A synchronised forward's `saved` makes
        # this backward synchronise too.
        dx, dweight, dbias = fastbn.backward(
            grad_output.detach(), input.detach(), _detached(weight), ctx.fastbn_saved, axis=1
        )
        return (
            _as_tensor(dx, input) if need_input else None,
            _as_tensor(dweight, input) if need_weight else None,
            _as_tensor(dbias, input) if need_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_tensor(value, name):
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bfloat16:
        raise TypeError(
            f"{name}: bfloat16 is not supported by fastbn; convert the module or tensor to "
            "float32 (or float16 input with float32 parameters)"
        )


def _float32(tensor):
    # torch accepts float16 parameters with float16 input; fastbn keeps
    # statistics and parameters in float32 for half input, so widen them.
    # .float() is differentiable: the gradient comes back as float16.
    if tensor is not None and tensor.dtype == torch.float16:
        return tensor.float()
    return tensor


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    """Batch normalization over dimension 1, like ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, ...)`` tensor of dtype float16, float32 or float64, on the
        CPU or a CUDA device, in any memory format (channels_last too).
    running_mean, running_var : torch.Tensor or None
        Running statistics, shape ``(C,)``, float32 for float16/float32
        input and float64 for float64 input (float16 is accepted with
        float16 input).  Updated in place when ``training`` is True; required
        when ``training`` is False.
    weight, bias : torch.Tensor, optional
        Per-channel scale and shift, same dtypes; default 1 and 0.
        Gradients flow to them.
    training : bool, default False
        Normalise with the batch statistics (and update the running ones) if
        True; with the running statistics if False.
    momentum : float, default 0.1
        In [0, 1]: ``running = (1 - momentum) * running + momentum * batch``,
        with the unbiased batch variance in ``running_var``.
    eps : float, default 1e-5
        Added to the variance before the square root.

    Returns
    -------
    torch.Tensor
        Same shape, dtype, device and memory format as ``input``; part of the
        autograd graph when any of input, weight, bias requires grad.

    Raises
    ------
    ValueError
        In training, if a channel has only one value (as torch).  Also for
        any argument fastbn rejects (e.g. momentum outside [0, 1]), before
        anything is computed or updated.
    TypeError
        For bfloat16 tensors and mismatched dtypes.
    RuntimeError
        If ``training`` is False and a running statistic is None (as torch).

    Notes
    -----
    Running statistics are treated as state: they get no gradient.  Only
    first derivatives are provided; differentiating the backward raises a
    RuntimeError.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, process_group):
    """:func:`batch_norm`, optionally synchronised over ``process_group``."""
    for name, value in (
        ("input", input),
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_tensor(value, name)
    if input is None:
        raise TypeError("input: expected a torch.Tensor, got None")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(
            "running_mean and running_var must be defined in evaluation mode (training=False)"
        )
    half_running = None
    if input.dtype == torch.float16:
        weight, bias = _float32(weight), _float32(bias)
        if running_mean is not None and torch.float16 in (running_mean.dtype, running_var.dtype):
            half_running = (running_mean, running_var)
            running_mean, running_var = running_mean.float(), running_var.float()
    output = _BatchNormFunction.apply(
        input, weight, bias, (running_mean, running_var), training, momentum, eps, process_group
    )
    if half_running is not None and training:
        with torch.no_grad():
            half_running[0].copy_(running_mean)
            half_running[1].copy_(running_var)
    return output


class _FastbnForward:
    """The forward of fastbn's BatchNorm modules, mixed into torch's classes.

    It follows torch's ``_BatchNorm.forward``: momentum None is a cumulative
    average (``1 / num_batches_tracked``), ``track_running_stats=False`` uses
    batch statistics in eval too, and eval uses the running statistics.  One
    difference: ``num_batches_tracked`` is incremented only once the batch
    went through, so a rejected batch leaves every buffer untouched.
    """

    def forward(self, input):
        """Normalise ``input`` (see :func:`batch_norm`); updates the buffers in training."""
        self._check_input_dim(input)
        update = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is not None:
            momentum = self.momentum
        elif update:
            # float() of a CUDA counter synchronises, as in torch itself.
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        else:
            momentum = 0.0  # no update happens
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are read in eval even with track_running_stats=False, if set.
        use_buffers = not self.training or self.track_running_stats
        output = _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            self._sync_group(batch_stats),
        )
        if update:
            self.num_batches_tracked.add_(1)
        return output

    def _sync_group(self, batch_stats):
        """The process group to synchronise statistics over, or None."""
        return None


class BatchNorm1d(_FastbnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels, for ``(N, C)`` or ``(N, C, L)`` input.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for a
        cumulative average.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        without them batch statistics are used in eval too.
    device, dtype : optional
        Where and in which dtype the parameters and buffers are created.

    Notes
    -----
    A subclass of ``torch.nn.BatchNorm1d``: same parameters, buffers and
    ``state_dict``, so checkpoints load both ways, and ``isinstance`` checks
    for torch's class keep working.  Differences from torch: ``momentum``
    must lie in [0, 1] (checked at the first forward), bfloat16 is refused,
    and a batch rejected in training does not advance
    ``num_batches_tracked``.
    """


class BatchNorm2d(_FastbnForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels, for ``(N, C, H, W)`` input.

    Both memory formats run without a copy: contiguous (NCHW) and
    channels_last (NHWC), whose output is channels_last too.  Parameters as
    for :class:`BatchNorm1d`.
    """


class BatchNorm3d(_FastbnForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels, for ``(N, C, D, H, W)`` input.

    Parameters as for :class:`BatchNorm1d`; channels_last_3d is supported.
    """


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _replace(module, cls):
    # Built on the meta device (nothing allocated), then given the very
    # tensors of the old module: an optimizer holding them keeps working.
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
    )
    for name, parameter in module.named_parameters(recurse=False):
        new.register_parameter(name, parameter)
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, buffer in module.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name not in non_persistent)
    new.train(module.training)
    return new


def convert(module):
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` for fastbn's.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single batch-norm module.

    Returns
    -------
    torch.nn.Module
        ``module`` with its batch-norm submodules replaced in place (or the
        replacement itself, if ``module`` is a batch-norm module).  Each
        replacement shares the original's parameter and buffer tensors, so
        the state, devices, dtypes, ``requires_grad`` flags and references
        held by an optimizer are kept, as is the train/eval mode.

    Notes
    -----
    Only those exact classes are replaced: subclasses (which may change the
    behaviour), ``SyncBatchNorm`` and still-uninitialised lazy modules are
    left alone.  A module reached through several parents is replaced by one
    shared replacement.  Hooks registered on a replaced module are not
    carried over.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    return _convert(module, {})


def _convert(module, done):
    if id(module) in done:
        return done[id(module)]
    cls = _REPLACEMENTS.get(type(module))
    converted = module if cls is None else _replace(module, cls)
    done[id(module)] = converted
    for name, child in list(converted.named_children()):
        new_child = _convert(child, done)
        if new_child is not child:
            setattr(converted, name, new_child)
    return converted


class SyncBatchNorm(_FastbnForward, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastbn's kernels and synchronisation.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype
        As for :class:`BatchNorm1d`.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronise over; the default group when None.

    Notes
    -----
    As torch's: in training, when torch.distributed is initialised and the
    group has more than one process, the batch statistics are those of the
    global batch; otherwise it behaves as a plain batch norm.  Unlike torch's,
    it runs on CPU tensors (gloo), gathers (count, mean, M2) rather than
    invstd (no precision lost), and takes processes with an empty batch.
    ``dweight`` and ``dbias`` are each process's contributions, which the
    usual data-parallel gradient all-reduce sums.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self, batch_stats):
        dist = torch.distributed
        if not (batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch norm in ``module`` (torch's or fastbn's) with this class.

        Parameters
        ----------
        module : torch.nn.Module
            A model, or a single batch-norm module.
        process_group : torch.distributed.ProcessGroup, optional
            The group the replacements synchronise over.

        Returns
        -------
        torch.nn.Module
            ``module`` with batch norms replaced (or the replacement itself);
            each replacement shares the original's parameters and buffers.
        """
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = _replace(module, cls)
            new.process_group = process_group
            return new
        for name, child in list(module.named_children()):
            new_child = cls.convert_sync_batchnorm(child, process_group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module
