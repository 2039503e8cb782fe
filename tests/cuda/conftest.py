"""GPU tests, run under Numba's CUDA simulator on machines without a GPU.

NUMBA_ENABLE_CUDASIM=1 must be set before Numba is first imported, so these
tests run in their own interpreter: tests/test_cuda_simulator.py starts
``python -m pytest tests/cuda`` with it set.  In any other pytest run (the
main suite, which has long imported Numba without it) this directory is not
collected at all.

The simulator runs one Python thread per CUDA thread, so the fixtures below
patch the launch sizes of fastbn.backends.cuda.plan small: one warp per
block, two elements per thread before a channel is split over several
blocks, two blocks for the grid-stride loops.  Tiny inputs then still take
the multi-block, grid-stride and merge paths that large inputs take on a GPU.
"""

from __future__ import annotations

import os
import sys

import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_ignore_collect(collection_path, config):
    """Collect nothing here unless the simulator is on (see the module docstring)."""
    if not SIMULATED:
        return True
    return None


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
