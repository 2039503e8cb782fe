"""A user's script that calls every public function; tests/test_types.py runs ``mypy --strict`` on it.

It is never run, only type-checked: each ``reveal_type`` names the type mypy gives a result, and
the test checks that none of them is (or contains) ``Any``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from typing_extensions import reveal_type

import fastbn
import fastbn.jax
import fastbn.torch

x = np.ones((8, 3), dtype=np.float32)
vector = np.ones(3, dtype=np.float32)

y, saved = fastbn.forward(x, vector, vector, running_mean=vector, running_var=vector, training=True, axis=1)
reveal_type(y)
reveal_type(saved)
reveal_type(saved.count)
reveal_type(saved.shape)
reveal_type(fastbn.backward(x, x, vector, saved))
reveal_type(fastbn.moments(x))
reveal_type(fastbn.normalize(x, vector, vector, vector, vector, eps=1e-5))
reveal_type(fastbn.fold(np.ones((3, 4), np.float32), None, vector, vector, vector, vector))
reveal_type(fastbn.empty_cache())
reveal_type(fastbn.threading_layer())

layer = fastbn.BatchNorm(3, momentum=None)
reveal_type(layer.train().eval())
reveal_type(layer(x))
reveal_type(layer.forward(x))
reveal_type(layer.backward(x))
reveal_type(layer.state_dict())
reveal_type(layer.load_state_dict(layer.state_dict()))
layer.reset_running_stats()
layer.reset_parameters()


Vector64 = np.ndarray[tuple[int, ...], np.dtype[np.float64]]


class Group:
    """A process group of one."""

    def allgather(self, vector: Vector64) -> Vector64:
        return vector[None]

    def allreduce_sum(self, vector: Vector64) -> Vector64:
        return vector


group: fastbn.Collectives = Group()
reveal_type(group.allreduce_sum(np.zeros(2)))
reveal_type(fastbn.forward(x, process_group=group))

tensor = torch.ones(8, 3)
reveal_type(fastbn.torch.batch_norm(tensor, None, None, training=True, activation="relu"))
module = fastbn.torch.BatchNorm2d(3, virtual_batch_size=2)
reveal_type(module.forward(torch.ones(4, 3, 2, 2)))
reveal_type(fastbn.torch.BatchNormAddReLU2d(3).forward(torch.ones(4, 3, 2, 2), torch.ones(4, 3, 2, 2)))
reveal_type(fastbn.torch.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3))))
reveal_type(fastbn.torch.revert(module))
reveal_type(fastbn.torch.SyncBatchNorm.convert_sync_batchnorm(module))

reveal_type(fastbn.jax.batch_norm(jnp.ones((8, 3)), running_mean=jnp.zeros(3), running_var=jnp.ones(3)))
