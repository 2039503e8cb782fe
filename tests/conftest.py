"""Shared pytest configuration: the Hypothesis profiles used by every property test, and a check of xdist's groups.

`ci` (the default) keeps the whole suite within a few minutes on 2 cores with a cold Numba
cache; `dev` explores more.  Pick one with HYPOTHESIS_PROFILE=dev.
"""

import gc
import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # the first example of a test pays for Numba compilation
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def young_heap():
    """Keep the cyclic collector, ``gc.collect()`` included, to the objects the test makes.

    A worker of this suite holds millions of objects by the time it reaches a test (torch,
    TensorFlow and JAX imported, hundreds of kernels compiled; Numba's compilation alone leaves
    about 60,000 per kernel), and one full collection walks them all: 0.8 s with the frameworks and
    a handful of kernels here, about 7 s late in a run (test_cuda_pool's 21 collections took 160 s).
    ``gc.freeze()`` moves everything alive now to the permanent generation for the test's duration:
    the test's own objects are collected as ever, cycles among them included, while the earlier
    tests' (their garbage included, which could otherwise return pool memory mid-test) are left
    alone until ``gc.unfreeze()`` hands them back to the collector.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Fail the tests whose ``xdist_group`` mark ``--dist loadgroup`` would silently ignore.

    The suite's heavy session fixtures (the Keras backend workers, mypy, the PTX compilation, the
    warm-cache fault probe) are meant to run once: their modules are marked with one xdist group
    each, and pytest-xdist sends a group to one worker by appending ``@group`` to the test ids.
    pytest 9.2 stopped reading the attribute pytest-xdist 3.8 writes (so pyproject pins pytest
    below 9.2); the groups were then ignored without a word and every such fixture ran once per
    worker, minutes of the suite's time.  This hook runs on each worker after xdist's own; an error
    raised here would be lost in xdist's scheduler, so the tests concerned fail instead, before
    their fixtures start.
    """
    if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup only
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_UNGROUPED] = (
                "pytest-xdist did not send this test's xdist_group to one worker: this pytest and "
                "pytest-xdist do not work together; install the versions pyproject.toml's test extra names"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)
