"""Synchronised batch norm: in-process with threads, then real multi-process launches."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastbn
from fastbn._sync import merge_moments

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sync_worker.py")


class ThreadGroup:
    """A process group of threads: the Collectives protocol on a barrier."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size

    def member(self, rank):
        group = self

        class Member:
            def allgather(self, vector):
                group.slots[rank] = np.array(vector, np.float64)
                group.barrier.wait()
                rows = np.stack(group.slots)
                group.barrier.wait()
                return rows

            def allreduce_sum(self, vector):
                return self.allgather(vector).sum(axis=0)

        return Member()


def test_merge_moments_matches_two_pass_over_the_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 3)) * 5 + 1e4 for n in (7, 0, 1, 40)]
    rows = [
        np.concatenate(
            ([len(p)], p.mean(0) if len(p) else np.zeros(3), ((p - p.mean(0)) ** 2).mean(0) if len(p) else np.zeros(3))
        )
        for p in parts
    ]
    count, mean, var = merge_moments(np.stack(rows), 3)
    whole = np.concatenate(parts)
    assert count == len(whole)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-14)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_group_matches_single_process(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 3, 4)) * 2 + 5).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(0.5, 2, 3).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y_ref, s_ref = fastbn.forward(x, w, b, running_mean=rm, running_var=rv)
    dx_ref, dw_ref, db_ref = fastbn.backward(dy, x, w, s_ref)
    edges = [0, 3, 3, 12]  # the middle process has an empty batch
    group = ThreadGroup(3)
    results = [None] * 3

    def run(rank):
        part = slice(edges[rank], edges[rank + 1])
        rm_local, rv_local = np.zeros(3, dtype), np.ones(3, dtype)
        y, saved = fastbn.forward(
            x[part], w, b, running_mean=rm_local, running_var=rv_local, process_group=group.member(rank)
        )
        results[rank] = (y, *fastbn.backward(dy[part], x[part], w, saved), rm_local, rv_local, saved.count)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(sum(r[2] for r in results), dw_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(sum(r[3] for r in results), db_ref, rtol=tol, atol=tol)
    for r in results:
        np.testing.assert_array_equal(r[4], results[0][4])  # identical on every process
        np.testing.assert_allclose(r[4], rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(r[5], rv, rtol=tol, atol=tol)
        assert r[6] == 12 * 4


def test_bad_process_group_is_rejected_before_anything_runs():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match="process_group"):
        fastbn.forward(np.ones((4, 3)), running_mean=rm, running_var=rv, process_group=object())
    assert rm.tobytes() == np.zeros(3).tobytes() and rv.tobytes() == np.ones(3).tobytes()


class _Returning:
    """A one-process group whose allgather returns ``answer(vector)`` (allreduce_sum: the identity)."""

    def __init__(self, answer):
        self.answer = answer

    def allgather(self, vector):
        return self.answer(vector)

    def allreduce_sum(self, vector):
        return vector


@pytest.mark.parametrize(
    "answer, error, message",
    [
        (lambda v: np.full((1, v.size), np.nan), ValueError, "element counts"),
        (lambda v: "abc", TypeError, "allgather returned str"),
        (lambda v: -v[None], ValueError, "element counts"),
        (lambda v: v[None][:0], ValueError, "shape"),
        (lambda v: v[None].astype(np.int64), TypeError, "dtype int64"),
        (lambda v: np.round(v[None]).astype(int).tolist(), TypeError, "list of dtype int64"),
        (lambda v: v[None].astype(np.complex128), TypeError, "dtype complex128"),
        (lambda v: np.concatenate((v[:1], v[1:4], -np.abs(v[4:]) - 1))[None], ValueError, "negative variance"),
        # Rows without this process's own: all-zero counts (the output was left unwritten, no error),
        # another process's row only, this one's altered in its last bit, or counts beyond 2^53.
        (lambda v: np.zeros((2, v.size)), ValueError, "none of which is the one this process sent"),
        (lambda v: np.concatenate(([5.0], v[1:]))[None], ValueError, "none of which is the one"),
        (lambda v: np.concatenate((v[:1], np.nextafter(v[1:], np.inf)))[None], ValueError, "none of which is the one"),
        (lambda v: np.stack((v, np.concatenate(([2.0**60], v[1:])))), ValueError, "more than 2.53"),
    ],
    ids=[
        "nan",
        "str",
        "negative-count",
        "no-rows",
        "int64",
        "int-list",
        "complex",
        "negative-var",
        "zero-counts",
        "other-row",
        "altered-row",
        "huge-count",
    ],
)
def test_what_allgather_returns_is_checked_before_any_update(answer, error, message):
    """A collective that returns the wrong thing is an error naming process_group, the state untouched."""
    rm, rv = np.zeros(3), np.ones(3)
    x = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(error, match=f"^process_group: .*{message}"):
        fastbn.forward(x, running_mean=rm, running_var=rv, process_group=_Returning(answer))
    assert rm.tobytes() == np.zeros(3).tobytes() and rv.tobytes() == np.ones(3).tobytes()
    y, _ = fastbn.forward(x, process_group=_Returning(lambda v: v[None]))  # the honest one-process group
    np.testing.assert_allclose(y, fastbn.forward(x)[0], rtol=1e-12, atol=1e-12)


def test_a_collectives_class_instead_of_an_instance_is_refused_by_name():
    """The class has the protocol's methods, so it passed the isinstance check and failed unbound, unnamed."""
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match=r"^process_group: expected an instance, got the class _Returning"):
        fastbn.forward(np.ones((4, 3)), running_mean=rm, running_var=rv, process_group=_Returning)
    assert rm.tobytes() == np.zeros(3).tobytes() and rv.tobytes() == np.ones(3).tobytes()


def test_integer_results_from_a_torch_group_or_allreduce_are_refused_by_name():
    """A torch int64 tensor has no NumPy dtype kind, so it passed as float and truncated the gathered statistics;
    allreduce_sum's result had no dtype check at all (truncated gradient sums)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    gather_ints = _Returning(lambda v: torch.tensor(v[None]).to(torch.int64))
    with pytest.raises(TypeError, match=r"^process_group: allgather returned Tensor of dtype int64"):
        fastbn.forward(x, running_mean=rm, running_var=rv, process_group=gather_ints)
    assert rm.tobytes() == np.zeros(3).tobytes() and rv.tobytes() == np.ones(3).tobytes()

    class SumsInts(_Returning):
        def allreduce_sum(self, vector):
            return torch.tensor(vector).long()

    _, saved = fastbn.forward(x, process_group=SumsInts(lambda v: v[None]))
    with pytest.raises(TypeError, match=r"^process_group: allreduce_sum returned Tensor of dtype int64"):
        fastbn.backward(np.ones_like(x), x, None, saved)


def test_one_value_in_the_global_batch_is_an_error_on_every_process():
    group = ThreadGroup(2)
    errors = [None, None]
    rm, rv = np.zeros(2), np.ones(2)

    def run(rank):
        x = np.ones((1 if rank == 0 else 0, 2))
        try:
            fastbn.forward(x, running_mean=rm, running_var=rv, process_group=group.member(rank))
        except ValueError as exc:
            errors[rank] = str(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(e and "Expected more than 1 value per channel" in e for e in errors), errors
    assert rm.tobytes() == np.zeros(2).tobytes() and rv.tobytes() == np.ones(2).tobytes()


# ------------------------------------------------------ real processes ---
def _mpiexec():
    pytest.importorskip("mpi4py")
    candidate = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    assert os.path.exists(candidate), "install the 'mpich' wheel (pip install mpich) for mpiexec"
    return candidate


@pytest.mark.parametrize("size", [2, 3])
def test_mpiexec(size):
    proc = subprocess.run(
        [_mpiexec(), "-n", str(size), sys.executable, WORKER, "mpi"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(re.findall(r"rank \d+ of \d+ ok", proc.stdout)) == [f"rank {r} of {size} ok" for r in range(size)]


def test_mpi_peer_death_ends_the_job():
    start = time.monotonic()
    proc = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, WORKER, "mpi", "--die-rank", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 120


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_torch(size, *extra, timeout=60, engine="torch"):
    pytest.importorskip("torch.distributed")
    port = _free_port()
    procs = []
    for rank in range(size):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            FASTBN_TEST_TIMEOUT=str(timeout),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, engine, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


@pytest.mark.parametrize("size", [2, 3])
def test_torch_distributed_gloo(size):
    outputs = _launch_torch(size)
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"rank {rank}: {out}{err}"
        assert out.strip() == f"rank {rank} of {size} ok"


def test_torch_sync_batchnorm_module_over_gloo():
    outputs = _launch_torch(3, engine="torch-module")
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"rank {rank}: {out}{err}"
        assert out.strip() == f"rank {rank} of 3 ok"


def test_torch_distributed_peer_death_raises_within_the_timeout():
    start = time.monotonic()
    outputs = _launch_torch(2, "--die-rank", "1", timeout=20)
    elapsed = time.monotonic() - start
    assert outputs[1][0] == 3
    assert outputs[0][0] != 0, "the survivor should have raised, not succeeded"
    assert elapsed < 120, elapsed


def test_data_parallel_example_matches_single_process_training():
    example = os.path.join(os.path.dirname(HERE), "examples", "train_data_parallel.py")
    proc = subprocess.run(
        [_mpiexec(), "-n", "3", sys.executable, example, "--epochs", "3"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"mean training loss (\S+)", proc.stdout)]
    differences = [float(v) for v in re.findall(r"single-process training (\S+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert max(differences) < 1e-4
    assert "max parameter difference between processes: 0" in proc.stdout
