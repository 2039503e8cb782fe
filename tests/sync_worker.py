"""One process of a synchronised batch-norm check, launched by tests/test_sync.py.

    mpiexec -n P python tests/sync_worker.py mpi
    RANK=r WORLD_SIZE=P MASTER_ADDR=127.0.0.1 MASTER_PORT=... python tests/sync_worker.py torch
    RANK=r WORLD_SIZE=P MASTER_ADDR=127.0.0.1 MASTER_PORT=... python tests/sync_worker.py torch-module

Every process builds the same global batch, takes its own uneven slice (one
process gets none), runs fastbn.forward/backward with ``process_group``, and
checks its outputs, its running statistics and the summed dweight/dbias
against single-process fastbn on the whole batch.  ``--die-rank R`` makes
rank R exit before the first collective, to check the others do not hang.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import fastbn

TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}


def slices(total, size):
    """Uneven per-rank batch sizes summing to ``total``, rank 1 empty."""
    weights = np.arange(1, size + 1, dtype=float)
    weights[1 % size] = 0.0
    counts = np.floor(total * weights / weights.sum()).astype(int)
    counts[-1] += total - counts.sum()
    edges = np.concatenate(([0], np.cumsum(counts)))
    return [slice(edges[r], edges[r + 1]) for r in range(size)]


def check(rank, size, group, summer):
    cases = [
        ((23, 5, 7), 1, np.float32),  # NCL, channel slab
        ((17, 3, 4, 6), -1, np.float64),  # channels-last
        ((31, 4), 1, np.float64),  # (N, C)
    ]
    for case, (shape, axis, dtype) in enumerate(cases):
        rng = np.random.default_rng(case)
        x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        channels = shape[axis]
        weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
        bias = rng.standard_normal(channels).astype(dtype)

        ref_rm, ref_rv = np.zeros(channels, dtype), np.ones(channels, dtype)
        y_ref, saved_ref = fastbn.forward(x, weight, bias, running_mean=ref_rm, running_var=ref_rv, axis=axis)
        dx_ref, dw_ref, db_ref = fastbn.backward(dy, x, weight, saved_ref, axis=axis)

        mine = slices(shape[0], size)[rank]
        rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
        for _ in range(2):  # two steps: running stats must stay identical everywhere
            y, saved = fastbn.forward(
                x[mine], weight, bias, running_mean=rm, running_var=rv, axis=axis, process_group=group
            )
        fastbn.forward(x, weight, bias, running_mean=ref_rm, running_var=ref_rv, axis=axis)
        dx, dw, db = fastbn.backward(dy[mine], x[mine], weight, saved, axis=axis)

        tol = TOLERANCE[dtype]
        assert saved.count == saved_ref.count, (saved.count, saved_ref.count)
        np.testing.assert_allclose(y, y_ref[mine], rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, dx_ref[mine], rtol=tol, atol=tol)
        np.testing.assert_allclose(rm, ref_rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(rv, ref_rv, rtol=tol, atol=tol)
        np.testing.assert_allclose(summer(dw), dw_ref, rtol=tol, atol=tol * np.abs(dw_ref).max())
        np.testing.assert_allclose(summer(db), db_ref, rtol=tol, atol=tol * np.abs(db_ref).max())
    print(f"rank {rank} of {size} ok", flush=True)


def check_module(rank, size, summer):
    """fastbn.torch.SyncBatchNorm over the group against torch.nn.BatchNorm2d on the whole batch."""
    import torch

    import fastbn.torch

    torch.manual_seed(0)
    x = torch.randn(13, 4, 5, 3, dtype=torch.float64) * 3 + 7
    probe = torch.randn_like(x)  # loss = sum(y * probe): additive over samples
    reference = torch.nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.normal_()
    synced = fastbn.torch.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=None, dtype=torch.float64))
    )[0]
    assert isinstance(synced, fastbn.torch.SyncBatchNorm)
    synced.load_state_dict(reference.state_dict())
    mine = slices(x.shape[0], size)[rank]
    for _ in range(2):
        x_ref = x.clone().requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * probe).sum().backward()
        x_mine = x[mine].clone().requires_grad_(True)
        y_mine = synced(x_mine)
        (y_mine * probe[mine]).sum().backward()
    tol = TOLERANCE[np.float64]
    np.testing.assert_allclose(y_mine.detach().numpy(), y_ref[mine].detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(x_mine.grad.numpy(), x_ref.grad[mine].numpy(), rtol=tol, atol=tol)
    for name in ("weight", "bias"):
        got = summer(getattr(synced, name).grad.numpy())
        np.testing.assert_allclose(got, getattr(reference, name).grad.numpy(), rtol=tol, atol=tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(synced, name).numpy(), getattr(reference, name).numpy(), rtol=tol)
    print(f"rank {rank} of {size} ok", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["mpi", "torch", "torch-module"])
    parser.add_argument("--die-rank", type=int, default=None)
    args = parser.parse_args()

    if args.engine == "mpi":
        from mpi4py import MPI

        group = MPI.COMM_WORLD
        rank, size = group.Get_rank(), group.Get_size()

        def summer(values):
            out = np.empty(values.shape, np.float64)
            group.Allreduce(values.astype(np.float64), out, op=MPI.SUM)
            return out
    else:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = float(os.environ.get("FASTBN_TEST_TIMEOUT", "60"))
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
        group = dist.group.WORLD

        def summer(values):
            tensor = torch.from_numpy(values.astype(np.float64))
            dist.all_reduce(tensor)
            return tensor.numpy()

    if args.die_rank == rank:
        os._exit(3)  # a crash: no clean-up, no goodbye to the peers
    if args.engine == "torch-module":
        check_module(rank, size, summer)
    else:
        check(rank, size, group, summer)
    if args.engine != "mpi":
        # Every rank done before any tears its group down: a rank leaving while a peer's gloo threads still talk
        # to it aborted one process ("terminate called without an active exception") in one CI run.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
