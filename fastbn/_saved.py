"""The check :func:`fastbn.backward` runs on the ``saved`` it is given (kept apart from fastbn._api for its length)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastbn import _options, _sync


def check_saved_fields(saved: Any) -> None:
    """The scalar fields of ``saved`` have the types forward gives them (a tampered Saved is refused).

    ``saved`` is a :class:`fastbn.Saved`, typed Any here: fastbn._api, which defines it, imports this module.
    """

    def bad(field: str, expected: str) -> TypeError:
        value = getattr(saved, field)
        return TypeError(f"saved.{field}: expected {expected}, as fastbn.forward returns it, got {value!r}")

    if not isinstance(saved.batch_stats, (bool, np.bool_)):
        raise bad("batch_stats", "True or False")
    if not isinstance(saved.residual, (bool, np.bool_)):
        raise bad("residual", "True or False")
    if not (isinstance(saved.shape, tuple) and all(isinstance(n, (int, np.integer)) and n >= 0 for n in saved.shape)):
        raise bad("shape", "a tuple of sizes")
    if isinstance(saved.axis, (bool, np.bool_)) or not isinstance(saved.axis, (int, np.integer)):
        raise bad("axis", "an integer")
    if isinstance(saved.count, (bool, np.bool_)) or not isinstance(saved.count, (int, np.integer)) or saved.count < 0:
        raise bad("count", "a non-negative integer")
    if saved.activation not in _options.ACTIVATIONS:
        raise bad("activation", "None or 'relu'")
    if (saved.r is None) != (saved.d is None):
        raise bad("d" if saved.d is None else "r", "renorm's r and d together, or neither")
    vbs = saved.virtual_batch_size
    if vbs is not None and (isinstance(vbs, (bool, np.bool_)) or not isinstance(vbs, (int, np.integer)) or vbs < 1):
        raise bad("virtual_batch_size", "None or a positive integer")
    if vbs is not None and saved.r is not None:
        raise bad("r", "None with ghost batches (forward does not combine renorm and virtual_batch_size)")
    if saved.process_group is not None:
        try:
            _sync.adapt(saved.process_group)
        except TypeError as exc:
            raise TypeError(f"saved.process_group: {str(exc).partition(': ')[2]}") from None
        # forward refuses these with a process group; the synchronised backward would ignore them
        for field, given in (
            ("activation", saved.activation is not None),
            ("residual", bool(saved.residual)),
            ("virtual_batch_size", vbs is not None),
            ("r", saved.r is not None),
        ):
            if given:
                raise bad("process_group", f"None together with saved.{field} (forward does not combine them)")


def check_saved_invstd(invstd: Any) -> None:
    """``saved.invstd`` is not negative: forward's ``1 / sqrt(var + eps)`` never is.

    NaN (a channel with NaN or Inf input) and inf (eval with ``eps=0`` on a zero variance) are what
    forward returns there, and pass; a negative value would silently flip the signs of dx and dweight.
    Host arrays only: a device array's values stay on the device (checking them would synchronise it).
    """
    if isinstance(invstd, np.ndarray) and invstd.size and bool(np.any(invstd < 0)):
        raise ValueError("saved.invstd: has negative values; fastbn.forward's invstd, 1 / sqrt(var + eps), never has")


def check_saved_weights(weights: np.ndarray, weight_sum: np.ndarray, axis: int) -> None:
    """``saved.weights`` and ``saved.weight_sum`` hold what forward kept: finite non-negative weights, and their sums.

    forward refuses other weights; a tampered pair would give NaN or
    silently wrong gradients.  The sums are compared in float64 with a
    relative tolerance of 1e-9 (forward's own sum may add in another order:
    at most n u of relative error, far below it for any n that fits memory).
    """
    if weights.size and not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("saved.weights: expected finite non-negative weights, as fastbn.forward keeps them")
    axes = tuple(i for i in range(weights.ndim) if i != axis)
    total = weights.sum(axis=axes, dtype=np.float64)
    if not np.allclose(weight_sum, total, rtol=1e-9, atol=0.0):
        raise ValueError("saved.weight_sum: is not the per-channel sum of saved.weights that fastbn.forward kept")
