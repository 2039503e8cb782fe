"""Synchronised batch norm across processes, on existing collective engines.

fastbn has no transport of its own.  A ``process_group`` is adapted to two
collectives on float64 NumPy vectors:

* ``allgather(vector) -> (P, len(vector)) array``, one row per process, in
  rank order;
* ``allreduce_sum(vector) -> vector``, the element-wise sum over processes.

Built-in adapters cover mpi4py communicators and torch.distributed process
groups (recognised by their type's module, never by importing mpi4py or
torch).  Anything else may pass an object with those two methods (see
:class:`Collectives`).

Forward all-gathers each process's ``(count, mean, var)`` per channel in one
buffer and merges them with Chan's formula, written for variances rather
than sums of squares (:func:`merge_moments`), so any batch sizes work, zero
included, no precision is lost (PyTorch's SyncBatchNorm gathers invstd and
rebuilds the variance from it) and no merge overflows where the merged
variance is finite.  Backward all-reduces ``sum_dy`` and
``dotp`` in one buffer and uses the global count.

A process whose peer dies is not left hanging by fastbn's design, but the
bound comes from the engine: MPI implementations abort the whole job when a
rank exits (``mpiexec`` then returns non-zero); torch.distributed raises
when a peer's connection drops and otherwise after the ``timeout`` given to
``init_process_group``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fastbn._frameworks import process_group_kind
from fastbn._typing import Float64Array

if TYPE_CHECKING:
    from fastbn.backends import SyncPieces

__all__ = ["Collectives", "adapt", "merge_moments"]


@runtime_checkable
class Collectives(Protocol):
    """What fastbn needs from a process group; implement it for any engine.

    Examples
    --------
    A single process is a group of one:

    >>> class Alone:
    ...     def allgather(self, vector):
    ...         return vector[None]
    ...
    ...     def allreduce_sum(self, vector):
    ...         return vector
    >>> isinstance(Alone(), fastbn.Collectives)
    True
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> y, saved = fastbn.forward(x, process_group=Alone())
    >>> bool(np.allclose(y, fastbn.forward(x)[0]))
    True
    """

    def allgather(self, vector: Float64Array) -> Float64Array:
        """Return every process's ``vector`` stacked as rows, in rank order."""

    def allreduce_sum(self, vector: Float64Array) -> Float64Array:
        """Return the element-wise sum of ``vector`` over all processes."""


class _MPICollectives:
    """mpi4py communicator: buffer-based Allgather / Allreduce (no pickling)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def allgather(self, vector: np.ndarray) -> np.ndarray:
        vector = np.ascontiguousarray(vector, dtype=np.float64)
        out = np.empty((self.comm.Get_size(), vector.size), np.float64)
        self.comm.Allgather(vector, out)
        return out

    def allreduce_sum(self, vector: np.ndarray) -> np.ndarray:
        vector = np.ascontiguousarray(vector, dtype=np.float64)
        out = np.empty_like(vector)
        self.comm.Allreduce(vector, out, op=sys.modules["mpi4py.MPI"].SUM)
        return out


class _TorchCollectives:
    """torch.distributed process group, with CPU tensors (gloo; MPI backend too)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.torch: Any = sys.modules["torch"]
        self.dist: Any = self.torch.distributed

    def allgather(self, vector: np.ndarray) -> np.ndarray:
        tensor = self.torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64))
        rows = [self.torch.empty_like(tensor) for _ in range(self.dist.get_world_size(self.group))]
        self.dist.all_gather(rows, tensor, group=self.group)
        return np.stack([row.numpy() for row in rows])

    def allreduce_sum(self, vector: np.ndarray) -> np.ndarray:
        tensor = self.torch.from_numpy(np.array(vector, dtype=np.float64))
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)
        return np.asarray(tensor.numpy())


def adapt(process_group: Any) -> Collectives:
    """Return :class:`Collectives` for ``process_group``, or raise TypeError.

    Parameters
    ----------
    process_group : object
        An mpi4py communicator (``mpi4py.MPI.Comm``), a torch.distributed
        ``ProcessGroup``, or any object with ``allgather`` and
        ``allreduce_sum`` methods.
    """
    kind = process_group_kind(process_group)
    if kind == "mpi":
        return _MPICollectives(process_group)
    if kind == "torch":
        return _TorchCollectives(process_group)
    if isinstance(process_group, type):
        # A class has the methods too (so passes the protocol check), but calling
        # them unbound would fail later, inside the collective, with no name.
        raise TypeError(
            f"process_group: expected an instance, got the class {process_group.__name__} (call it to make one)"
        )
    if isinstance(process_group, Collectives):
        return process_group
    raise TypeError(
        "process_group: expected an mpi4py communicator, a torch.distributed process group, "
        f"or an object with allgather() and allreduce_sum() methods, got {type(process_group).__name__}"
    )


def _floats(returned: Any, collective: str, expected: str) -> np.ndarray:
    """A collective's result as float64, refused (naming process_group) unless it holds floats.

    Converted first as it is (a NumPy array, a torch tensor, a list), so that
    its own dtype is what is checked: integers (a torch int64 tensor, a list of
    ints) have truncated the float64 values sent, and complex or other kinds
    are not what was sent either.
    """
    try:
        array = np.asarray(returned)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"process_group: {collective} returned {type(returned).__name__}, expected {expected}") from exc
    if array.dtype.kind != "f":
        raise TypeError(
            f"process_group: {collective} returned {type(returned).__name__} of dtype {array.dtype}, expected the "
            "float64 values sent (an integer or other type has lost them)"
        )
    return array.astype(np.float64, copy=False)


def _checked_rows(returned: Any, channels: int, sent: np.ndarray | None = None) -> np.ndarray:
    """What ``allgather`` returned, as float64 rows ``[count, mean..., var...]``; else an error naming it.

    Checked before anything uses it (so before the running statistics are
    touched): a collective that returns something else (another shape, no
    rows, integers that truncated the float64 values sent, a count that is not
    a non-negative whole number, a negative variance) would otherwise give
    NaN or silently wrong statistics.  Where ``sent`` (this process's own
    row) is given, one of the rows must be it, bit for bit, as any all-gather
    returns it: a result without it (all counts zero while this process has
    data, say) would normalise this process's data with statistics that do
    not include it, or leave its output unwritten.  The counts must also sum
    to at most 2^53, where float64 still holds every whole number exactly.
    """
    width = 1 + 2 * channels
    rows = _floats(returned, "allgather", f"a (processes, {width}) array of float64")
    if rows.ndim != 2 or rows.shape[1] != width or rows.shape[0] == 0:
        raise ValueError(f"process_group: allgather returned shape {rows.shape}, expected (processes >= 1, {width})")
    counts = rows[:, 0]
    if not (np.isfinite(counts).all() and (counts >= 0).all() and (counts == np.round(counts)).all()):
        raise ValueError(
            f"process_group: allgather returned element counts {counts.tolist()}, expected non-negative whole numbers"
        )
    if counts.sum() > 2.0**53:
        raise ValueError(
            f"process_group: allgather returned element counts summing to {counts.sum():.6g}, more than 2^53 "
            "(float64 no longer holds such counts exactly)"
        )
    if (rows[:, 1 + channels :] < 0).any():
        raise ValueError("process_group: allgather returned a negative variance")
    if sent is not None and not (rows.view(np.uint64) == sent.astype(np.float64).view(np.uint64)).all(axis=1).any():
        raise ValueError(
            f"process_group: allgather returned rows none of which is the one this process sent (its count "
            f"{sent[0]:.0f}, counts returned {counts.tolist()}): every process's own row must be among them"
        )
    return rows


def merge_moments(gathered: Any, channels: int, sent: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge all-gathered per-process ``[count, mean..., var...]`` rows with Chan's formula.

    Parameters
    ----------
    gathered : numpy.ndarray
        Shape ``(P, 1 + 2 * channels)``: each process's element count per
        channel, then its per-channel means, then its per-channel biased
        variances.
    channels : int
        C.
    sent : numpy.ndarray, optional
        This process's own row, which must be among ``gathered`` bit for bit.

    Returns
    -------
    count : int
        Global elements per channel.
    mean, var : numpy.ndarray
        Global per-channel mean and biased variance, float64.

    Notes
    -----
    With ``w_a = n_a / n`` and ``w_b = n_b / n``, the merge of two summaries
    is ``mean = w_a mean_a + w_b mean_b`` and ``var = w_a var_a + w_b var_b +
    (w_a delta) (w_b delta)``, ``delta = mean_b - mean_a``.  Every term is at
    most the result, so nothing overflows where the merged variance is
    finite; the sum-of-squares form (M2 = n var) overflows from n var > 1.8e308.
    The convex form of the mean keeps a process's +inf mean +inf (``mean_a +
    delta w_b`` would give inf - inf).  Empty processes are skipped, so an
    empty first process adds nothing (``delta**2 * 0`` would be NaN for huge
    means).  Rows are merged in rank order, the same on every process, so
    every process gets identical bits.  Each merge rounds each term once:
    relative error at most 4 u (u = 2^-53) per process.
    """
    gathered = _checked_rows(gathered, channels, sent)
    count = 0.0
    mean = np.zeros(channels)
    var = np.zeros(channels)
    for row in gathered:
        size, piece_mean, piece_var = row[0], row[1 : 1 + channels], row[1 + channels :]
        if size == 0:
            continue
        if count == 0:
            mean, var = piece_mean.copy(), piece_var.copy()
        else:
            total = count + size
            w_a, w_b = count / total, size / total
            delta = piece_mean - mean
            mean = w_a * mean + w_b * piece_mean
            var = w_a * var + w_b * piece_var + (w_a * delta) * (w_b * delta)
        count += size
    return int(count), mean, var


def forward(
    pieces: SyncPieces,
    collectives: Collectives,
    x: Any,
    axis: int,
    dtype: np.dtype,
    weight: Any,
    bias: Any,
    eps: float,
    running_mean: Any,
    running_var: Any,
    momentum: float,
    training: bool,
    update: bool,
) -> tuple[Any, Any, Any, int]:
    """Synchronised training forward; returns ``(y, mean, invstd, global_count)``.

    One all-gather of ``[count, mean (C), var (C)]``; then every process
    normalises its own slice and updates its running statistics identically.
    """
    channels = x.shape[axis]
    count = x.size // channels if channels else 0
    mean64, var64 = pieces.local_moments(x, axis)
    vector = np.concatenate(([float(count)], mean64, var64))
    total, mean64, var64 = merge_moments(collectives.allgather(vector), channels, vector)
    # Checked on the global count, which every process sees alike, so all
    # processes raise together and none is left waiting in a collective.
    if total == 0:
        # Empty on every process (all see it alike): as without a group, an empty output and the
        # running statistics left alone.
        nan = np.full(channels, np.nan, dtype)
        return np.empty(tuple(x.shape), x.dtype), nan, nan.copy(), 0
    if training and total == 1:
        raise ValueError("x: Expected more than 1 value per channel when training, got 1 over all processes")
    y, mean, invstd = pieces.normalize_with_stats(x, axis, dtype, mean64, var64, weight, bias, eps)
    if update:
        pieces.update_running(running_mean, running_var, mean64, var64, momentum, total)
    return y, mean, invstd, total


def backward(
    pieces: SyncPieces,
    collectives: Collectives,
    dy: Any,
    x: Any,
    axis: int,
    dtype: np.dtype,
    weight: Any,
    mean: Any,
    invstd: Any,
    total: int,
) -> tuple[Any, Any, Any]:
    """Synchronised training backward; returns ``(dx, dweight, dbias)``.

    One all-reduce of ``[sum_dy (C), dotp (C)]``.  dweight and dbias are this
    process's contributions, as in torch.nn.SyncBatchNorm, so the usual
    data-parallel gradient all-reduce sums them.
    """
    channels = x.shape[axis]
    if total == 0:  # every process was empty in forward (it returned before any collective; so here)
        return np.empty(tuple(x.shape), x.dtype), np.zeros(channels, dtype), np.zeros(channels, dtype)
    sum_dy, dotp = pieces.backward_sums(dy, x, axis, mean)
    returned = collectives.allreduce_sum(np.concatenate((sum_dy, dotp)))
    summed = _floats(returned, "allreduce_sum", f"{2 * channels} float64 numbers")
    if summed.shape != (2 * channels,):
        raise ValueError(f"process_group: allreduce_sum returned shape {summed.shape}, expected ({2 * channels},)")
    dx = pieces.backward_dx(dy, x, axis, dtype, weight, mean, invstd, summed[:channels], summed[channels:], total)
    dweight = (dotp * invstd.astype(np.float64)).astype(dtype)
    return dx, dweight, sum_dy.astype(dtype)
