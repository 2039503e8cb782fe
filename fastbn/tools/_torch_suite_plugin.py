"""pytest plugin loaded by ``python -m fastbn torch-suite`` in each of its pytest runs.

It is passed as ``-p fastbn.tools._torch_suite_plugin``, so pytest imports it
while it starts, before any conftest and before any test module: the swap
below therefore happens before PyTorch's test files (and the test databases
they import, which capture ``torch.nn.BatchNorm2d`` or
``torch.nn.functional.batch_norm`` when they are built) are imported.

Environment (set by :mod:`fastbn.tools.torch_suite`):

``FASTBN_TORCH_SUITE_SWAP``
    ``1``: replace torch's batch-norm classes and function by fastbn's (see
    :func:`install_swap`); anything else: plain torch.
``FASTBN_TORCH_SUITE_RESULTS``
    A file to which one JSON object per line is appended: the selected test
    ids (``{"selected": [...]}``), then one record per test phase.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

#: What :func:`install_swap` replaces: (module path, attribute, fastbn.torch name).  ``torch.nn.modules``
#: is the namespace ``torch.nn`` re-exports and the one ``module_db`` names its tests after
#: (``common_modules.MODULE_CLASS_NAMES``): swapped there too, the swapped tests keep torch's
#: names (``..._nn_BatchNorm2d_...``) and any skip keyed on them.
SWAPPED = (
    *tuple(
        (namespace, name, name)
        for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
        for namespace in ("torch.nn", "torch.nn.modules")
    ),
    ("torch.nn.functional", "batch_norm", "batch_norm"),
)


def install_swap() -> list[str]:
    """Replace torch's public batch-norm names by fastbn's, as a user would.

    Returns
    -------
    list of str
        The names replaced, e.g. ``"torch.nn.functional.batch_norm"``.

    Notes
    -----
    ``fastbn.torch`` is imported first, while torch's names are still torch's
    (its classes subclass torch's).  The replacement is a plain assignment, so
    the new object is the very ``fastbn.torch`` object.  ``torch.batch_norm``
    (the ATen operator, which has another signature) and the defining module
    ``torch.nn.modules.batchnorm`` are left alone; see the module docstring of
    :mod:`fastbn.tools.torch_suite`.
    """
    import importlib

    import fastbn.torch as fastbn_torch

    done: list[str] = []
    for module_name, attribute, replacement in SWAPPED:
        module = importlib.import_module(module_name)
        setattr(module, attribute, getattr(fastbn_torch, replacement))
        done.append(f"{module_name}.{attribute}")
    return done


_RESULTS = os.environ.get("FASTBN_TORCH_SUITE_RESULTS")
_SWAPPED = install_swap() if os.environ.get("FASTBN_TORCH_SUITE_SWAP") == "1" else []


def _write(record: dict[str, Any]) -> None:
    if _RESULTS:
        with open(_RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _first_line(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The first non-empty line of a report's failure or skip message.

    For a chained exception that is the first (root) exception of the chain:
    PyTorch's OpInfo tests re-raise a sample's failure as ``Exception: ...``
    or "Composite compliance check failed with the above error", which names
    no cause.
    """
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        chain = getattr(longrepr, "chain", None) or []
        crash = chain[0][1] if chain and chain[0][1] is not None else getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:500]
    return ""


def pytest_report_header(config: pytest.Config) -> str:
    """Say in pytest's header which implementation this run exercises."""
    return "fastbn torch-suite: " + ("swapped " + ", ".join(_SWAPPED) if _SWAPPED else "plain torch")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Record the test ids selected for this run (after ``-k`` deselected the others)."""
    _write({"selected": [item.nodeid for item in session.items]})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Record a module that could not be collected (import error and the like)."""
    if report.failed:
        _write({"collect_error": report.nodeid, "message": _first_line(report)})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record one phase (setup, call, teardown) of one test."""
    _write(
        {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "wasxfail": hasattr(report, "wasxfail"),
            "message": "" if report.passed else _first_line(report),
            "duration": report.duration,
        }
    )
