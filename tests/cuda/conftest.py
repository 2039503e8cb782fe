"""The CUDA tests: under Numba's CUDA simulator on machines without a GPU, or on a real GPU.

* **Simulator** (CI, every machine): NUMBA_ENABLE_CUDASIM=1 must be set
  before Numba is first imported, so these tests run in their own
  interpreter: tests/test_cuda_simulator.py starts ``python -m pytest
  tests/cuda`` with it set.
* **Hardware**: ``FASTBN_GPU_TESTS=1 python -m pytest tests/cuda`` (what
  ``python -m fastbn gpu-check`` runs) runs the same tests on the first GPU,
  on real device arrays; test_cuda_torch.py adds PyTorch CUDA tensors
  there.  With the variable set and no usable GPU, collection fails: a
  hardware run that checked nothing must not look like a pass.

In any other pytest run (the main suite, which has long imported Numba
without the simulator) this directory is not collected at all.

The simulator runs one Python thread per CUDA thread, so the fixtures below
patch the launch sizes of fastbn.backends.cuda.plan small: one warp per
block, two elements per thread before a channel is split over several
blocks, two blocks for the grid-stride loops.  Tiny inputs then still take
the multi-block, grid-stride and merge paths that large inputs take on a GPU
(on hardware too: the tests' inputs are the simulator's sizes).
"""

from __future__ import annotations

import os
import sys

import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
HARDWARE = not SIMULATED and os.environ.get("FASTBN_GPU_TESTS") == "1"


def pytest_ignore_collect(collection_path, config):
    """Collect nothing here unless the simulator is on or a hardware run is asked for."""
    if not (SIMULATED or HARDWARE):
        return True
    if collection_path.name in ("test_cuda_torch.py", "test_cuda_hardware.py") and not HARDWARE:
        return True  # torch's CUDA tensors, and streams to order, exist on hardware only
    return None


def pytest_configure(config):
    if HARDWARE:
        from fastbn.backends.cuda import target

        if not target.is_available():
            raise pytest.UsageError("FASTBN_GPU_TESTS=1 but no usable CUDA GPU (numba.cuda.is_available() is False)")


if SIMULATED:
    # The simulator's block manager polls its threads in a busy loop; a short
    # switch interval hands the interpreter to the simulated threads sooner.
    sys.setswitchinterval(5e-4)


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    """Launch sizes small enough for the simulator (see the module docstring).

    Returns the plan module; a test may set any other launch size on it
    directly, and every launch size is restored after the test.
    """
    from fastbn.backends.cuda import plan

    monkeypatch.setattr(plan, "THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(plan, "ITEMS_PER_THREAD", 2)
    monkeypatch.setattr(plan, "MAX_ELEMENTWISE_BLOCKS", 2)
    # Unchanged here, but registered so that a test's own setting is undone too.
    monkeypatch.setattr(plan, "MAX_SPLITS", plan.MAX_SPLITS)
    monkeypatch.setattr(plan, "MAX_GROUPS_PER_LAUNCH", plan.MAX_GROUPS_PER_LAUNCH)
    return plan


@pytest.fixture
def launches(monkeypatch):
    """The list of kernel launches made during the test: (name, grid, block, args)."""
    from fastbn.backends.cuda import plan

    log = []
    monkeypatch.setattr(plan, "LAUNCH_LOG", log)
    return log
