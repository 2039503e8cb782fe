"""fastbn's torch modules: drop-ins for ``torch.nn.BatchNorm*d`` and ``SyncBatchNorm``, and fused forms.

The modules subclass torch's, so constructor, parameters, buffers,
``state_dict``, ``repr`` and input checks are torch's own; only ``forward``
runs on fastbn, through :func:`fastbn.torch.batch_norm` (the custom
operator).  :func:`convert` swaps torch's modules for these and
:func:`revert` swaps them back, sharing the very tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch.autograd.function import once_differentiable

import fastbn
from fastbn.torch._functional import TorchErrors, _fused_options, _widen, batch_norm

if TYPE_CHECKING:
    # The mixins below are only ever mixed into torch's batch norm classes, whose attributes they use.
    _TorchBatchNorm = torch.nn.modules.batchnorm._BatchNorm
else:
    _TorchBatchNorm = object

_ModuleT = TypeVar("_ModuleT", bound=torch.nn.Module)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "SyncBatchNorm",
    "TorchBatchNormAddReLU",
    "convert",
    "revert",
]


def _bump_version(tensor: torch.Tensor) -> None:
    # fastbn writes running statistics through a view torch cannot see, so
    # tell autograd, as torch's own in-place update would: a graph that saved
    # the old values then fails loudly instead of using the new ones.
    if not tensor.is_inference():
        torch.autograd.graph.increment_version(tensor)


class _SyncFunction(torch.autograd.Function):
    """Synchronised batch norm (SyncBatchNorm in training): fastbn.forward/backward with a process group.

    A process group cannot cross a custom operator's schema, so this path
    stays an eager ``autograd.Function``; torch.compile runs it outside the
    graph (a graph break).  Running statistics arrive packed in a tuple: state,
    not differentiable inputs.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Any, weight: Any, bias: Any, running: Any, momentum: float, eps: float, process_group: Any
    ) -> Any:
        running_mean, running_var = running
        y, saved = fastbn.forward(
            input.detach(),
            weight,
            bias,
            running_mean=running_mean,
            running_var=running_var,
            training=True,
            momentum=momentum,
            eps=eps,
            axis=1,
            process_group=process_group,
            _any_momentum=True,
        )
        if running_mean is not None:
            _bump_version(running_mean)
            _bump_version(running_var)
        ctx.save_for_backward(input, weight)
        ctx.fastbn_saved = saved
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Any) -> Any:
        input, weight = ctx.saved_tensors
        dx, dweight, dbias = fastbn.backward(grad_output.detach(), input.detach(), weight, ctx.fastbn_saved, axis=1)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dweight if need[1] else None,
            dbias if need[2] else None,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # type: ignore[untyped-decorator]  # unannotated in torch
def _synchronised(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    process_group: Any,
) -> torch.Tensor:
    """Synchronised batch norm in training; float16/bfloat16 parameters and buffers widened as in batch_norm."""
    weight, bias = _widen(weight), _widen(bias)
    running: tuple[Any, Any] = (_widen(running_mean), _widen(running_var))
    with TorchErrors():
        # torch.autograd.Function.apply is unannotated.
        output: torch.Tensor = _SyncFunction.apply(  # type: ignore[no-untyped-call]
            input, weight, bias, running, momentum, eps, process_group
        )
    if running_mean is not None and running[0] is not running_mean:
        assert running_var is not None  # both or neither: torch's buffers
        with torch.no_grad():
            running_mean.copy_(running[0])
            running_var.copy_(running[1])
    return output


class _FastbnForward(_TorchBatchNorm):
    """The forward of fastbn's BatchNorm modules, mixed into torch's classes.

    It follows torch's ``_BatchNorm.forward``: momentum None is a cumulative
    average (``1 / num_batches_tracked``), ``track_running_stats=False`` uses
    batch statistics in eval too, and eval uses the running statistics.  One
    difference: ``num_batches_tracked`` is incremented exactly when the running
    statistics took the batch in (or an empty batch went through, as in
    torch), so a rejected batch leaves every buffer untouched, and an
    interrupt (KeyboardInterrupt) that lands after the kernel still counts
    the batch the statistics hold.
    """

    activation: Literal["relu"] | None = None
    virtual_batch_size: int | None = None
    renorm: tuple[float, float] | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (see :func:`fastbn.torch.batch_norm`); updates the buffers in training."""
        return self._normalize(input, None)

    def _normalize(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        self._check_input_dim(input)  # type: ignore[no-untyped-call]  # unannotated in torch
        update = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is not None:
            momentum = self.momentum
        elif update:
            # float() of a CUDA counter synchronises, as in torch itself.
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)  # type: ignore[arg-type]  # update: a tensor
        else:
            momentum = 0.0  # no update happens
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are read in eval even with track_running_stats=False, if set.
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        group = self._sync_group(batch_stats)
        args = (input, residual, running_mean, running_var, batch_stats, momentum, group)
        written = running_mean if running_mean is not None else running_var
        # Compiled code, torch.func transforms (whose wrapped tensors keep a version of their own) and
        # inference tensors take the straight path, as torch's own module does.
        if (
            not update
            or written is None
            or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or written.is_inference()  # inference tensors keep no version
        ):
            output = self._run(*args)
            if update:
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]  # update: a tensor
            return output
        # The kernel writes the running statistics; the count follows once it returns.  An asynchronous
        # exception (KeyboardInterrupt, a signal handler's) can land in between, at the first Python step
        # after the kernel, so the count also follows the statistics' version counter, not the return alone:
        # a batch the statistics took in is counted however the call ends (tests/test_torch_adapter.py).
        # A completed call is counted even if it wrote nothing (an empty batch, as torch counts it).
        version, completed = written._version, False
        try:
            output = self._run(*args)
            completed = True
        finally:
            if completed or written._version != version:
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]  # update: a tensor
        return output

    def _run(
        self,
        input: torch.Tensor,
        residual: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        batch_stats: bool,
        momentum: float,
        group: Any,
    ) -> torch.Tensor:
        """The batch norm call itself: synchronised over ``group``, or fastbn.torch.batch_norm."""
        if group is not None:
            output: torch.Tensor = _synchronised(
                input, running_mean, running_var, self.weight, self.bias, momentum, self.eps, group
            )
            return output
        return batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            activation=self.activation,
            residual=residual,
            virtual_batch_size=self.virtual_batch_size,
            renorm=self._renorm(running_mean, batch_stats),
        )

    def _renorm(self, running_mean: torch.Tensor | None, batch_stats: bool) -> tuple[float, float] | None:
        """The renorm to pass: None in eval and without the option; refused in training without running statistics."""
        renorm = self.renorm
        if renorm is None or not (batch_stats and self.training):
            return None if running_mean is None else renorm
        if running_mean is None:  # the buffers were set to None after construction
            raise ValueError("renorm: batch renormalization needs running statistics, and running_mean is None")
        return renorm

    def _sync_group(self, batch_stats: bool) -> Any:
        """The process group to synchronise statistics over, or None."""
        return None


class _Options(_FastbnForward):
    """fastbn's options as keyword-only constructor arguments of the BatchNorm modules."""

    def __init__(
        self,
        *args: Any,
        virtual_batch_size: int | None = None,
        renorm: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # torch's arguments (num_features, eps, momentum, affine,
        # track_running_stats, device, dtype, bias) go to torch unchanged.
        super().__init__(*args, **kwargs)
        _, self.virtual_batch_size, rmax, dmax = _fused_options(None, virtual_batch_size, renorm)
        self.renorm = None if rmax is None or dmax is None else (rmax, dmax)
        if self.renorm is not None and not self.track_running_stats:
            # Batch renormalization corrects the batch statistics towards the running ones: without them
            # training would silently be plain batch norm (fastbn.torch.batch_norm refuses it likewise).
            raise ValueError("renorm: batch renormalization needs running statistics (track_running_stats=True)")

    def extra_repr(self) -> str:
        text: str = super().extra_repr()  # type: ignore[no-untyped-call]  # unannotated in torch
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.renorm is not None:
            text += f", renorm={self.renorm}"
        return text


class BatchNorm1d(_Options, torch.nn.BatchNorm1d):
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
    bias : bool, default True, keyword-only
        With ``affine``, learn ``bias`` too; False learns ``weight`` only.
    virtual_batch_size : int, optional, keyword-only
        Ghost batch norm: in training, each group of this many samples is
        normalised with its own statistics (see :func:`fastbn.forward`).
    renorm : tuple of (float, float), optional, keyword-only
        ``(rmax, dmax)``: batch renormalization in training, against the
        running statistics (see :func:`fastbn.forward`).

    Notes
    -----
    A subclass of ``torch.nn.BatchNorm1d``: same parameters, buffers and
    ``state_dict``, so checkpoints load both ways, and ``isinstance`` checks
    for torch's class keep working.  It works under ``torch.compile``
    (``fullgraph=True`` too), ``torch.export``, ``torch.func`` and autocast.
    One difference from torch: a batch rejected in training does not advance
    ``num_batches_tracked``.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.BatchNorm1d(2)
    >>> y = bn(torch.arange(8.0).reshape(4, 2))
    >>> isinstance(bn, torch.nn.BatchNorm1d), y[:, 0].detach().round(decimals=3), bn.running_mean
    (True, tensor([-1.3420, -0.4470,  0.4470,  1.3420]), tensor([0.3000, 0.4000]))
    """


class BatchNorm2d(_Options, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels, for ``(N, C, H, W)`` input.

    Both memory formats run without a copy: contiguous (NCHW) and
    channels_last (NHWC), whose output is channels_last too.  Parameters as
    for :class:`BatchNorm1d`.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    >>> y = fastbn.torch.BatchNorm2d(3)(x)
    >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
    (torch.Size([2, 3, 4, 4]), True)
    """


class BatchNorm3d(_Options, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels, for ``(N, C, D, H, W)`` input.

    Parameters as for :class:`BatchNorm1d`; channels_last_3d is supported.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> fastbn.torch.BatchNorm3d(3)(torch.randn(2, 3, 2, 2, 2)).shape
    torch.Size([2, 3, 2, 2, 2])
    """


def _fused_doc(n: str, what: str) -> str:
    shape = {"1d": "4, 3", "2d": "2, 3, 2, 2", "3d": "2, 3, 2, 2, 2"}[n]
    kind, args = ("AddReLU", "x, torch.ones_like(x)") if "residual" in what else ("ReLU", "x")
    return f"""``BatchNorm{n}`` followed by {what}, in one pass over the data.

    Parameters as for :class:`BatchNorm{n}`; the state (and ``state_dict``) is
    that of a ``torch.nn.BatchNorm{n}``.  :func:`revert` turns it into torch
    modules computing the same.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn({shape})
    >>> y = fastbn.torch.BatchNorm{kind}{n}(3)({args})
    >>> y.shape, bool((y >= 0).all())
    (torch.Size([{shape}]), True)
    """


class BatchNormReLU1d(BatchNorm1d):
    __doc__ = _fused_doc("1d", "a ReLU: ``relu(BN(x))``")
    activation = "relu"


class BatchNormReLU2d(BatchNorm2d):
    __doc__ = _fused_doc("2d", "a ReLU: ``relu(BN(x))``")
    activation = "relu"


class BatchNormReLU3d(BatchNorm3d):
    __doc__ = _fused_doc("3d", "a ReLU: ``relu(BN(x))``")
    activation = "relu"


class _AddReLU(_TorchBatchNorm):
    """``forward(input, residual)``: ``relu(BN(input) + residual)``, the end of a residual block."""

    activation = "relu"
    _normalize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # _FastbnForward's

    # Two inputs where torch's forward takes one: the fused module's interface, on purpose.
    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``relu(BN(input) + residual)``; ``residual`` has input's shape and dtype and gets a gradient."""
        return self._normalize(input, residual)


# The ignores: forward(input, residual) differs from BatchNorm1d's, on purpose (see _AddReLU).
class BatchNormAddReLU1d(_AddReLU, BatchNorm1d):  # type: ignore[misc]
    __doc__ = _fused_doc("1d", "a residual add and a ReLU: ``forward(x, z)`` is ``relu(BN(x) + z)``")


class BatchNormAddReLU2d(_AddReLU, BatchNorm2d):  # type: ignore[misc]
    __doc__ = _fused_doc("2d", "a residual add and a ReLU: ``forward(x, z)`` is ``relu(BN(x) + z)``")


class BatchNormAddReLU3d(_AddReLU, BatchNorm3d):  # type: ignore[misc]
    __doc__ = _fused_doc("3d", "a residual add and a ReLU: ``forward(x, z)`` is ``relu(BN(x) + z)``")


_REPLACEMENTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _replace(module: Any, cls: type[_ModuleT]) -> _ModuleT:
    # Built on the meta device (nothing allocated), then given the very
    # tensors of the old module: an optimizer holding them keeps working.
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
        bias=module.bias is not None or not module.affine,  # torch's weight-only affine (bias=False)
    )
    for name, parameter in module.named_parameters(recurse=False):
        new.register_parameter(name, parameter)
    non_persistent: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    for name, buffer in module.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name not in non_persistent)
    new.train(module.training)
    return new


def convert(module: torch.nn.Module) -> torch.nn.Module:
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

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> model = fastbn.torch.convert(model)
    >>> type(model[1]).__module__, isinstance(model[1], torch.nn.BatchNorm1d)
    ('fastbn.torch._modules', True)
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    return _swap(module, {}, _converted)


def _converted(module: torch.nn.Module) -> torch.nn.Module:
    cls = _REPLACEMENTS.get(type(module))
    return module if cls is None else _replace(module, cls)


def _swap(
    module: torch.nn.Module,
    done: dict[int, torch.nn.Module],
    replacement: Callable[[torch.nn.Module], torch.nn.Module],
) -> torch.nn.Module:
    """``module`` with ``replacement(m)`` in place of each submodule ``m`` (each replaced once)."""
    if id(module) in done:
        return done[id(module)]
    swapped = replacement(module)
    done[id(module)] = swapped
    for name, child in list(swapped.named_children()):
        new_child = _swap(child, done, replacement)
        if new_child is not child:
            setattr(swapped, name, new_child)
    return swapped


class TorchBatchNormAddReLU(torch.nn.Module):
    """``relu(bn(input) + residual)`` in torch alone: what :func:`revert` makes of a ``BatchNormAddReLU*d``.

    Parameters
    ----------
    bn : torch.nn.modules.batchnorm._BatchNorm
        The batch norm (torch's own), kept as the child ``bn``.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> m = fastbn.torch.revert(fastbn.torch.BatchNormAddReLU1d(3))
    >>> type(m).__name__, type(m.bn) is torch.nn.BatchNorm1d
    ('TorchBatchNormAddReLU', True)
    """

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``relu(bn(input) + residual)``."""
        return torch.relu(self.bn(input) + residual)


_TORCH_CLASSES = (
    (BatchNorm1d, torch.nn.BatchNorm1d),
    (BatchNorm2d, torch.nn.BatchNorm2d),
    (BatchNorm3d, torch.nn.BatchNorm3d),
)


def _reverted(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, SyncBatchNorm):
        new = _replace(module, torch.nn.SyncBatchNorm)
        new.process_group = module.process_group
        return new
    for ours, theirs in _TORCH_CLASSES:
        if isinstance(module, ours):
            bn = _replace(module, theirs)
            if isinstance(module, _AddReLU):
                return TorchBatchNormAddReLU(bn)
            if module.activation == "relu":
                return torch.nn.Sequential(bn, torch.nn.ReLU())
            return bn
    return module


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Swap fastbn's modules in ``module`` back for torch's, for ONNX, TorchScript or a machine without fastbn.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single fastbn module.

    Returns
    -------
    torch.nn.Module
        ``module`` with fastbn's modules replaced in place (or the replacement
        itself): ``BatchNorm*d`` and ``SyncBatchNorm`` by torch's classes,
        ``BatchNormReLU*d`` by ``torch.nn.Sequential(torch.nn.BatchNorm*d,
        torch.nn.ReLU())``, ``BatchNormAddReLU*d`` by
        :class:`TorchBatchNormAddReLU`.  Each shares the original's parameter
        and buffer tensors and mode, as :func:`convert` does.

    Raises
    ------
    ValueError
        If a module uses ghost batches or renorm, which torch has no module
        for; raised before anything is replaced.

    Notes
    -----
    The fused modules' state moves under a child (``0.`` in the Sequential,
    ``bn.`` in :class:`TorchBatchNormAddReLU`), so their ``state_dict`` keys
    change; plain batch norms keep theirs.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), fastbn.torch.BatchNormReLU1d(3))
    >>> model = fastbn.torch.revert(model)
    >>> [type(m).__name__ for m in model[1]]
    ['BatchNorm1d', 'ReLU']
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    for name, sub in module.named_modules(remove_duplicate=True):
        if isinstance(sub, _Options) and (sub.virtual_batch_size is not None or sub.renorm is not None):
            raise ValueError(
                f"module: {name or type(sub).__name__} uses ghost batches or renorm, which torch has "
                "no module for; nothing was reverted"
            )
    return _swap(module, {}, _reverted)


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

    Examples
    --------
    Without an initialised process group it is a plain batch norm:

    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> model = fastbn.torch.SyncBatchNorm.convert_sync_batchnorm(model)
    >>> type(model[1]).__name__, model(torch.randn(8, 4)).shape
    ('SyncBatchNorm', torch.Size([8, 3]))
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self, batch_stats: bool) -> Any:
        dist = torch.distributed
        if not (batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
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

        Raises
        ------
        ValueError
            If one of fastbn's modules fuses a ReLU or a residual add, or uses
            ghost batches or renorm: a synchronised batch norm does neither,
            and replacing it would silently drop them (or, for the residual,
            change its forward's arguments).  Raised before anything is
            replaced.
        """
        for name, sub in module.named_modules(remove_duplicate=True):
            fused = isinstance(sub, _FastbnForward) and sub.activation is not None  # (not a transformer's)
            options = isinstance(sub, _Options) and (sub.virtual_batch_size is not None or sub.renorm is not None)
            if fused or options:
                what = "a fused ReLU (or residual add)" if fused else "ghost batches or renorm"
                raise ValueError(
                    f"module: {name or type(sub).__name__} uses {what}, which SyncBatchNorm does not do (the "
                    "synchronised batch norm is a plain one); nothing was converted"
                )
        return _to_sync(module, cls, process_group)


def _to_sync(module: torch.nn.Module, cls: type[SyncBatchNorm], process_group: Any) -> torch.nn.Module:
    """:meth:`SyncBatchNorm.convert_sync_batchnorm` once its checks passed: the replacement, recursively."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
        new = _replace(module, cls)
        new.process_group = process_group
        return new
    for name, child in list(module.named_children()):
        new_child = _to_sync(child, cls, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
