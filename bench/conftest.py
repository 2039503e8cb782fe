"""pytest configuration for the benchmarks in bench/ (not part of the default test run).

Run the CPU benchmarks (fastbn, its peers -- NumPy, PyTorch, JAX, Flax and
TensorFlow, each skipped with the reason when absent -- and the roofline's three
copies, every operation and shape of the performance matrix) with::

    python -m pytest bench --benchmark-only -p no:cacheprovider

and compare the groups in pytest-benchmark's table (``--benchmark-group-by=group``
is the default here: one group per operation, shape and dtype).  Select a part
with ``-k``, e.g. ``-k "forward_train and 64x64x56x56"``.  Every peer is optional:
without it, its benchmarks are skipped.  bench/bench_gpu.py (CUDA) skips itself
on a machine without a GPU.

Each benchmark warms up before timing (``warmup_rounds``), so Numba's compile
time never counts; ``test_compile_time`` measures it on its own, in a fresh
interpreter with an empty kernel cache.  For the Markdown report and charts
behind the README, use ``python -m fastbn bench`` instead: it times the same
table of implementations (fastbn/tools/cases.py) and evaluates the release bar.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_configure(config):
    # Without pytest-benchmark every benchmark would fail on a missing ``benchmark`` fixture.
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise pytest.UsageError("the benchmarks in bench/ need pytest-benchmark: pip install 'fastbn[bench]'")


# testpaths is tests/, and pytest only collects test_*.py files by default;
# these benchmark modules are named bench_*.py, so collect them here.


def pytest_collect_file(file_path, parent):
    # A file named on the command line (python -m pytest bench/bench_gpu.py) is collected by pytest
    # itself; a second Module here would run every benchmark in it twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
