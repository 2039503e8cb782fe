"""Shared pytest configuration: the Hypothesis profiles used by every property test, a check of xdist's
groups, and the suite's own size and time for the README (``FASTBN_SUITE_REPORT``).

`ci` (the default) keeps the whole suite within a few minutes on 2 cores with a cold Numba
cache; `dev` explores more.  Pick one with HYPOTHESIS_PROFILE=dev.
"""

import gc
import glob
import os
import time

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


# ------------------------------------------------------------------ the suite's size and time ---
_SUITE_REPORT = "FASTBN_SUITE_REPORT"
_started = pytest.StashKey[tuple[float, int]]()


def _cache_indexes():
    """How many Numba cache index files exist for fastbn's kernels now (0: every kernel compiles)."""
    import fastbn

    roots = [os.path.dirname(fastbn.__file__), os.environ.get("NUMBA_CACHE_DIR", "")]
    return sum(len(glob.glob(os.path.join(root, "**", "*.nbi"), recursive=True)) for root in roots if root)


def pytest_sessionstart(session):
    if os.environ.get(_SUITE_REPORT) and not hasattr(session.config, "workerinput"):
        session.config.stash[_started] = (time.monotonic(), _cache_indexes())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With ``FASTBN_SUITE_REPORT=FILE``, write the run's size and time to FILE (the README's section).

    Only for a run of the whole suite (the configured test paths, no ``-k`` or ``-m``) that passed,
    on the controller of an xdist run; otherwise it says why it wrote nothing.
    """
    path = os.environ.get(_SUITE_REPORT)
    if not path or hasattr(config, "workerinput") or _started not in config.stash:
        return
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if not whole or config.option.keyword or config.option.markexpr or exitstatus != 0:
        terminalreporter.write_line(f"{_SUITE_REPORT}: not written (only a passing run of the whole suite is reported)")
        return
    from fastbn.backends.cpu.machine import machine

    start, indexes = config.stash[_started]
    seconds = time.monotonic() - start
    counts = {key: len(terminalreporter.stats.get(key, [])) for key in ("passed", "skipped", "xfailed")}
    workers = getattr(config.option, "numprocesses", None) or 0
    cache = "an empty kernel cache (every kernel compiled)" if indexes == 0 else f"{indexes} kernel cache indexes"
    text = (
        f"{sum(counts.values())} tests ({counts['passed']} passed, {counts['skipped']} skipped, "
        f"{counts['xfailed']} expected failures) in {int(seconds // 60)} min {int(seconds % 60)} s, "
        f"on {machine().describe()}, with {workers or 'no'} pytest-xdist workers, from {cache}, "
        f"on {time.strftime('%Y-%m-%d')}.\n\n"
        f"Measured by the README's test command with `{_SUITE_REPORT}={path}` set (tests/conftest.py).\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    terminalreporter.write_line(f"{_SUITE_REPORT}: wrote {path}")
