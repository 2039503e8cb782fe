"""PyTorch adapter: fastbn's kernels behind torch's batch-norm API, as custom operators.

* :func:`batch_norm` has the signature and semantics of
  ``torch.nn.functional.batch_norm`` (plus fastbn's fused forms as
  keyword-only options: ReLU, residual add, ghost batches, renorm).
* :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are
  drop-in ``torch.nn`` modules: they subclass ``torch.nn.BatchNorm*d``, so the
  constructor, parameters, buffers, ``state_dict``, ``repr`` and input checks
  are torch's own, and only ``forward`` runs on fastbn.
  :class:`BatchNormReLU2d` and :class:`BatchNormAddReLU2d` (and their 1d/3d
  kin) fuse the activation and the residual add.
* :func:`convert` swaps every ``torch.nn.BatchNorm*d`` in a model for these;
  :func:`revert` swaps fastbn's back for torch's (ONNX, TorchScript, a
  machine without fastbn).
* :func:`moments` and :func:`normalize` are ``tf.nn.moments`` (reduction
  axes, ``keepdim``, ``weights``, ``mask``) and ``tf.nn.batch_normalization``
  (broadcast parameter shapes) on torch tensors, differentiable twice in every
  tensor, as the custom operators ``torch.ops.fastbn.moments`` and
  ``torch.ops.fastbn.normalize`` (:mod:`fastbn.torch._stats`).
* :class:`SyncBatchNorm` is a drop-in ``torch.nn.SyncBatchNorm`` (with
  ``convert_sync_batchnorm``): statistics of the global batch over a
  torch.distributed process group.  It runs on CPU tensors (gloo) too.

The computation is registered as two custom operators,
``torch.ops.fastbn.batch_norm`` and ``torch.ops.fastbn.batch_norm_backward``
(:mod:`fastbn.torch._ops`): torch.compile (``fullgraph=True``, every backend,
dynamic shapes), ``torch.export``, ``torch.func`` (``grad``, ``vmap``,
``jacrev``, ``jvp``), double backward and autocast all work, and Dynamo never
traces into Numba.  CPU tensors run on fastbn's CPU kernels without a copy
(NumPy views of their memory, channels_last included); CUDA tensors go to
fastbn's CUDA backend.

Errors are raised before anything runs, as :class:`BatchNormError` (both a
``ValueError`` and a ``RuntimeError``) or :class:`BatchNormTypeError` (a
``TypeError`` and a ``RuntimeError``), with torch's message text.

Importing this module imports torch; ``import fastbn`` alone never does.
"""

from __future__ import annotations

from fastbn._frameworks import missing_dependency

try:
    import torch  # noqa: F401  (here, so that a missing torch is named by the extra that installs it)
except ModuleNotFoundError as exc:
    raise missing_dependency("fastbn.torch", "PyTorch", "torch", exc) from exc

from fastbn.torch._checks import BatchNormError, BatchNormIndexError, BatchNormTypeError
from fastbn.torch._functional import batch_norm
from fastbn.torch._modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    SyncBatchNorm,
    TorchBatchNormAddReLU,
    convert,
    revert,
)
from fastbn.torch._stats import moments, normalize

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "BatchNormError",
    "BatchNormIndexError",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchNormTypeError",
    "SyncBatchNorm",
    "TorchBatchNormAddReLU",
    "batch_norm",
    "convert",
    "moments",
    "normalize",
    "revert",
]
