"""fastbn: fast, framework-agnostic batch normalization on Numba kernels.

The functional API follows ``torch.nn.functional.batch_norm``:

* :func:`forward` / :func:`backward`: training and eval batch norm and its gradients;
* :func:`moments` / :func:`normalize`: the two steps on their own;
* :func:`fold`: merge eval-mode batch norm into the layer before it;
* :func:`empty_cache`: release the memory kept for recycling large outputs;
* :func:`threading_layer`: the Numba threading layer the CPU kernels run on.

:func:`forward` also fuses a ReLU, a residual add, ghost batches and batch
renormalization into its passes.  :class:`BatchNorm` is a stateful layer for
custom trainers; :class:`Collectives` is what synchronised batch norm needs
from a process group.

``import fastbn`` is cheap: it imports neither Numba nor any framework, and
compiles nothing.  Kernels compile on first use and are cached on disk.
"""

from fastbn._api import Saved, backward, forward
from fastbn._steps import fold, moments, normalize
from fastbn._sync import Collectives
from fastbn.backends.cpu.alloc import empty_cache
from fastbn.backends.cpu.threads import threading_layer
from fastbn.layer import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Collectives",
    "Saved",
    "__version__",
    "backward",
    "empty_cache",
    "fold",
    "forward",
    "moments",
    "normalize",
    "threading_layer",
]
