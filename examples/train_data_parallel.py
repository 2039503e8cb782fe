"""Data-parallel training with synchronised batch norm, launched with mpiexec.

    mpiexec -n 2 python examples/train_data_parallel.py --epochs 10

Every process holds the same model and takes its own slice of each minibatch
(uneven slices are fine).  fastbn.BatchNorm(..., process_group=MPI.COMM_WORLD)
normalises with the statistics of the whole minibatch, so the processes
together compute exactly what one process would on the full minibatch.  Each
process's parameter gradients are its contributions; one Allreduce sums them
and every process takes the same SGD step.

To show that equivalence, rank 0 also trains a single-process replica on the
full minibatches from the same initial weights and prints, after every epoch,
the largest relative difference between the two models' parameters and
running statistics.  It stays at float32 rounding (the per-channel sums are
added in a different order on 1 and on P processes); the processes
themselves stay bit-for-bit equal.  (On the raw, unscaled features the same
comparison drifts apart after a few epochs: training there is chaotic enough
to amplify rounding differences, as between any two runs that sum in a
different order.  Standardized features keep the comparison meaningful.)

The network is examples/train_mlp.py's (dense, ReLU, BatchNorm), on
scikit-learn's breast-cancer data, standardized features.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_mlp import DTYPE, Dense, ReLU, load_data

import fastbn


def build(n_in, hidden, n_out, rng, process_group):
    """Dense-ReLU-BatchNorm twice, then a dense classifier."""
    layers = []
    for width_in in (n_in, hidden):
        layers += [
            Dense(width_in, hidden, rng),
            ReLU(),
            fastbn.BatchNorm(hidden, dtype=DTYPE, process_group=process_group),
        ]
    return [*layers, Dense(hidden, n_out, rng)]


def step(layers, x, labels, total, lr, allreduce):
    """One SGD step on this process's slice; returns this slice's summed loss.

    The loss is the mean over the *global* minibatch of ``total`` samples, so
    each process scales its gradient by 1 / total and the sum over processes
    is the full gradient.
    """
    out = x
    for layer in layers:
        out = layer(out)
    shifted = out - out.max(axis=1, keepdims=True) if len(out) else out
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(len(labels))
    loss_sum = float(np.sum(log_sum - shifted[rows, labels]))
    grad = np.exp(shifted - log_sum[:, None])
    grad[rows, labels] -= 1.0
    grad = (grad / total).astype(DTYPE)
    for layer in reversed(layers):
        grad = layer.backward(grad)
    for layer in layers:
        params = layer.parameters()
        grads = [np.asarray(g, np.float64) for g in layer.gradients()]
        summed = allreduce(np.concatenate([g.ravel() for g in grads])) if grads else None
        offset = 0
        for p in params:
            p -= (lr * summed[offset : offset + p.size].reshape(p.shape)).astype(p.dtype)
            offset += p.size
    return loss_sum


def state(layers):
    """Every parameter and running statistic, flattened, for comparison."""
    arrays = []
    for layer in layers:
        arrays += [np.ravel(p) for p in layer.parameters()]
        if isinstance(layer, fastbn.BatchNorm):
            arrays += [layer.running_mean, layer.running_var]
    return np.concatenate(arrays).astype(np.float64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        from mpi4py import MPI
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "examples/train_data_parallel.py needs mpi4py: pip install 'fastbn[mpi]'", name=exc.name
        ) from exc

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def allreduce(vector):
        out = np.empty_like(vector)
        comm.Allreduce(vector, out, op=MPI.SUM)
        return out

    data, y_train, _, _ = load_data(args.seed)
    x_train = data["standardized"][0]
    rng = np.random.default_rng(args.seed)
    layers = build(x_train.shape[1], 32, 2, rng, comm)
    replica = None
    if rank == 0:
        replica = copy.deepcopy(layers)
        for layer in replica:
            if isinstance(layer, fastbn.BatchNorm):
                layer.process_group = None

    def relative_difference():
        reference = state(replica)
        # Relative, floored at 1: parameters and running stats differ in scale.
        return float(np.max(np.abs(state(layers) - reference) / np.maximum(np.abs(reference), 1.0)))

    order_rng = np.random.default_rng(args.seed + 1)
    differences = []
    for epoch in range(args.epochs):
        order = order_rng.permutation(len(x_train))
        epoch_loss = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            if len(batch) < 2:
                continue
            mine = np.array_split(batch, size)[rank]  # uneven when size does not divide it
            local = step(layers, x_train[mine], y_train[mine], len(batch), args.lr, allreduce)
            epoch_loss += comm.allreduce(local, op=MPI.SUM)
            if replica is not None:
                step(replica, x_train[batch], y_train[batch], len(batch), args.lr, lambda v: v)
        if rank == 0:
            differences.append(relative_difference())
            print(
                f"epoch {epoch + 1:3d}  mean training loss {epoch_loss / len(x_train):.4f}  "
                f"max relative difference from single-process training {differences[-1]:.2g}",
                flush=True,
            )

    states = comm.gather(state(layers), root=0)
    if rank == 0:
        spread = max(float(np.abs(s - states[0]).max()) for s in states)
        print(f"{size} processes; max parameter difference between processes: {spread:.3g}")
        return 0 if spread == 0.0 and max(differences, default=0.0) < 1e-4 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
