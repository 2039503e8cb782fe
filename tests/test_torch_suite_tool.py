"""``python -m fastbn torch-suite`` end to end, on a tiny stand-in for a PyTorch checkout.

The stand-in's test/test_nn.py has one test that passes either way, one that passes only on
plain torch (it looks at which function ``torch.nn.functional.batch_norm`` is, so no fastbn kernel
is compiled), one that fails on torch too, and one that -k deselects.  Skips only when torch is
missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from fastbn.tools import torch_suite  # noqa: E402

FAKE_TEST_NN = """
import torch
import torch.nn as nn
import torch.nn.functional as F

SWAPPED_AT_IMPORT = F.batch_norm.__module__.startswith("fastbn")
CLASS_AT_IMPORT = nn.BatchNorm2d


def test_batchnorm_passes_everywhere():
    assert nn.BatchNorm2d(3).num_features == 3


def test_batchnorm_torch_only():
    assert F.batch_norm.__module__.startswith("torch"), "swapped: " + F.batch_norm.__module__


def test_batchnorm_swapped_before_import():
    # the swap is in place before the test module is imported, in the swapped run only
    assert SWAPPED_AT_IMPORT == CLASS_AT_IMPORT.__module__.startswith("fastbn")
    assert CLASS_AT_IMPORT is nn.BatchNorm2d


def test_batch_norm_broken_on_torch():
    raise RuntimeError("broken here too")


def test_unrelated():
    raise AssertionError("deselected by -k, never run")
"""


# The module fixture runs once: every test here on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("torch-suite")


def torch_suite_command(*args):
    """``python -m fastbn torch-suite ARGS`` in a subprocess: the completed process, its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "fastbn", "torch-suite", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")  # kept when other modules' tests come between these on the worker
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("pytorch-src")
    (root / "test").mkdir()
    (root / "test" / "test_nn.py").write_text(FAKE_TEST_NN)
    (root / "version.txt").write_text("0.0.0-fake\n")
    out, summary = root / "report.json", root / "summary.md"
    proc = torch_suite_command(
        "--pytorch-src",
        root,
        "--out",
        out,
        "--target",
        "test/test_nn.py::batchnorm or batch_norm",
        "--target",
        "test/absent.py::batchnorm",
        "--summary",
        summary,
    )
    return proc, json.loads(out.read_text()), summary.read_text(), root


def test_exit_code_and_text_report(report):
    proc = report[0]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one test passes on torch only
    assert "pass on torch, fail swapped: 1" in proc.stdout
    assert "test_batchnorm_torch_only: failed: AssertionError: swapped: fastbn" in proc.stdout
    assert "absent from the checkout" in proc.stdout
    assert "version: 0.0.0-fake" in proc.stdout


def test_json_report_counts_and_groups(report):
    data = report[1]
    entry, absent = data["targets"]
    assert absent == {"file": "test/absent.py", "k": "batchnorm", "absent": True}
    assert entry["plain"]["counts"]["collected"] == entry["swapped"]["counts"]["collected"] == 4
    assert entry["plain"]["counts"]["passed"] == 3 and entry["swapped"]["counts"]["passed"] == 2
    assert list(entry["swapped_only_failures"]) == ["test_nn.py::test_batchnorm_torch_only"]
    assert list(entry["broken_on_torch"]) == ["test_nn.py::test_batch_norm_broken_on_torch"]
    assert "broken here too" in entry["broken_on_torch"]["test_nn.py::test_batch_norm_broken_on_torch"]
    assert data["totals"]["swapped_only_failures"] == 1
    assert "torch.nn.functional.batch_norm -> fastbn.torch.batch_norm" in data["swapped"]


def test_usage_errors(tmp_path):
    proc = torch_suite_command("--pytorch-src", tmp_path)
    assert proc.returncode == 2 and "test_nn.py not found" in proc.stdout
    with pytest.raises(ValueError, match="FILE::EXPR"):
        torch_suite.parse_targets(["test/test_nn.py"])
    assert torch_suite.parse_targets(None) == torch_suite.DEFAULT_TARGETS


def test_outcomes_from_phase_records():
    def phase(when, outcome, wasxfail=False, message=""):
        return {"when": when, "outcome": outcome, "wasxfail": wasxfail, "message": message}

    assert torch_suite._outcome([phase("setup", "passed"), phase("call", "passed")]) == ("passed", "")
    assert torch_suite._outcome([phase("setup", "failed", message="E")])[0] == "error"
    assert torch_suite._outcome([phase("setup", "passed"), phase("call", "skipped", True, "x")]) == ("xfailed", "x")
    assert torch_suite._outcome([phase("setup", "passed"), phase("call", "passed", True)])[0] == "xpassed"
    assert torch_suite._outcome([])[0] == "not run"
    groups = torch_suite.compare(
        {"a": ("passed", ""), "b": ("failed", "m"), "c": ("passed", "")},
        {"a": ("passed", ""), "b": ("passed", ""), "c": ("skipped", "s")},
    )
    assert groups["fixed_by_swap"] == {"b": "m"} and groups["skipped_swapped"] == {"c": "skipped: s"}
    assert not groups["swapped_only_failures"]


def test_markdown_summary_for_the_readme(report):
    """--summary: the README's generated section, with the counts of the run and its failures."""
    data, summary = report[1], report[2]
    assert "PyTorch 0.0.0-fake's tests" in summary and f"torch {data['torch']}" in summary
    assert "| test/test_nn.py | `batchnorm or batch_norm` | 3 | 2 | 0 |" in summary
    assert "| test/absent.py | `batchnorm` | absent | | |" in summary
    assert (
        "Of the 3 tests that pass on torch, 2 pass with fastbn swapped in (and of those that fail on torch, 0 pass"
        in summary
    )
    assert "- `test_batchnorm_torch_only` (test/test_nn.py): failed: AssertionError: swapped: fastbn" in summary
    assert data["machine"] in summary and data["fastbn_commit"] in summary


def test_one_mode_alone_reports_its_counts_and_writes_no_summary(report, tmp_path):
    root = report[3]
    proc = torch_suite_command(
        "--pytorch-src",
        root,
        "--mode",
        "plain",
        "--target",
        "test/test_nn.py::batchnorm",
        "--summary",
        tmp_path / "summary.md",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plain_passed 3" in proc.stdout and "--summary needs both runs" in proc.stdout
    assert not (tmp_path / "summary.md").exists()
