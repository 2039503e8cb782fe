"""``python -m fastbn gpu-check`` without a GPU: it refuses, and its parts work on hand-made results.

On this machine (no GPU) the command must exit with status 2 and say why, both without a driver and
with the CUDA simulator on, running nothing.  The report writer is a pure function of the collected
results, so it is checked here on a small benchmark JSON in pytest-benchmark's format and a JUnit XML
in pytest's; the time budget is checked with a step that outlives its timeout.  Every test is fast:
the two refusals start an interpreter each, the budget tests sleep about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastbn.tools import gpu_check
from fastbn.tools.gpu_check import Step, StepResult

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check(**environment):
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-m", "fastbn", "gpu-check", "--out", "never-written"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPOSITORY,
        check=False,
    )


@pytest.fixture(scope="module")
def machine_has_gpu():
    from numba import cuda

    return bool(cuda.is_available()) and not cuda.config.ENABLE_CUDASIM


def test_refuses_without_a_gpu(machine_has_gpu):
    if machine_has_gpu:
        pytest.skip("this machine has a GPU")
    proc = _gpu_check()
    assert proc.returncode == 2, proc.stderr
    assert "No GPU" in proc.stderr
    assert "numba.cuda.is_available() is false" in proc.stderr
    assert "Nothing was run" in proc.stderr
    assert not os.path.exists(os.path.join(REPOSITORY, "never-written"))


def test_refuses_under_the_simulator():
    proc = _gpu_check(NUMBA_ENABLE_CUDASIM="1")
    assert proc.returncode == 2, proc.stderr
    assert "No GPU: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1)" in proc.stderr
    assert not os.path.exists(os.path.join(REPOSITORY, "never-written"))


def test_missing_numba_cuda_names_the_extra(monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "numba.cuda", raising=False)  # not simulated: as if never imported
    reason = gpu_check.gpu_absent_reason()
    assert "numba-cuda" in reason and "pip install 'fastbn[cuda]'" in reason


# ---------------------------------------------------------------- the report, from hand-made results ---

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="1.0">
<testcase classname="tests.cuda.test_cuda_backend" name="test_forward[nchw]" time="0.1" />
<testcase classname="tests.cuda.test_cuda_backend" name="test_backward[nhwc]" time="0.1">
<failure message="AssertionError: max error 3e-2 &gt; 1e-3&#10;second line">traceback</failure></testcase>
<testcase classname="tests.cuda.test_cuda_fused.TestRelu" name="test_mask" time="0.1">
<error message="failed on setup with &quot;CudaAPIError: 700&quot;">traceback</error></testcase>
<testcase classname="tests.cuda.test_cuda_layer" name="test_half" time="0.0">
<skipped type="pytest.skip" message="no float16">skip</skipped></testcase>
<testcase time="0.000" />
</testsuite></testsuites>
"""


def _stats(median, rounds=30):
    # The fields pytest-benchmark 5 writes for each figure (seconds).
    return {
        "min": median * 0.9,
        "max": median * 1.2,
        "mean": median,
        "stddev": median / 50,
        "rounds": rounds,
        "median": median,
        "iqr": median / 20,
        "q1": median * 0.98,
        "q3": median * 1.03,
        "iqr_outliers": 0,
        "stddev_outliers": 1,
        "outliers": "1;0",
        "ld15iqr": median * 0.9,
        "hd15iqr": median * 1.2,
        "ops": 1 / median,
        "total": median * rounds,
        "data": [median] * rounds,
        "iterations": 1,
    }


def _figure(test, param, group, median, **extra):
    return {
        "group": group,
        "name": f"{test}[{param}]" if param else test,
        "fullname": f"bench/bench_gpu.py::{test}" + (f"[{param}]" if param else ""),
        "params": {"case": param} if param else None,
        "param": param,
        "extra_info": extra,
        "options": {"disable_gc": False, "timer": "cuda-events(numba)", "min_rounds": 5, "max_time": 1.0},
        "stats": _stats(median),
    }


CASE = "nchw-64x64x56x56-f32"
ROOFLINE = 4e12  # bytes/s
BENCHMARK = {
    "machine_info": {"node": "gpu-box", "cpu": {"brand_raw": "Some CPU"}},
    "commit_info": {"id": "abc", "dirty": False},
    "benchmarks": [
        _figure("test_roofline_copy", None, "roofline", 0.5e-3, op="copy", case="1024 MiB", impl="roofline",
                bytes_moved=2 << 30, best_bytes_per_s=ROOFLINE, repeats=10, l2_bytes=60 << 20),
        _figure("test_fastbn_forward", CASE, f"forward {CASE}", 1e-4, op="forward", case=CASE, impl="fastbn",
                min_bytes_moved=300_000_000, roofline_bytes_per_s=ROOFLINE, roofline_ms=0.075),
        _figure("test_cudnn_forward", CASE, f"forward {CASE}", 1.25e-4, op="forward", case=CASE, impl="cudnn"),
        _figure("test_fastbn_backward", CASE, f"backward {CASE}", 2e-4, op="backward", case=CASE, impl="fastbn",
                min_bytes_moved=480_000_000, roofline_bytes_per_s=ROOFLINE, roofline_ms=0.12),
        _figure("test_cudnn_backward", CASE, f"backward {CASE}", 1e-4, op="backward", case=CASE, impl="cudnn"),
        _figure("test_first_call_compiles", "float32", "first call (compilation)", 4.2, op="first call",
                case="float32", impl="fastbn", first_call_s=3.9, second_call_s=0.001),
        _figure("test_add_relu_forward", f"fastbn-separate-{CASE}", f"forward add+relu {CASE}", 3e-4,
                op="forward add+relu", case=CASE, impl="fastbn-separate"),
    ],
    "datetime": "2026-12-01T20:00:00.000000+00:00",
    "version": "5.3.1",
}  # fmt: skip

DEVICE = {
    "name": "NVIDIA H200",
    "compute_capability": "9.0",
    "memory_bytes": 150 * 2**30,
    "l2_bytes": 60 * 2**20,
    "driver_version": "13.0",
    "cuda_runtime_version": "13.0",
    "cudnn_version": 91000,
}
VERSIONS = {"fastbn": "0.9.0", "numba-cuda": "0.30.4", "git commit": "1e0a178"}


def test_parse_junit_counts_and_failures(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT, encoding="utf-8")
    counts, failures = gpu_check.parse_junit(path)
    assert counts == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures == [
        "tests.cuda.test_cuda_backend::test_backward[nhwc]: AssertionError: max error 3e-2 > 1e-3",
        'tests.cuda.test_cuda_fused.TestRelu::test_mask: failed on setup with "CudaAPIError: 700"',
    ]


def test_benchmark_rows_ratios_and_roofline_fractions():
    rows, others, roofline = gpu_check.benchmark_rows(BENCHMARK)
    assert roofline == ROOFLINE
    forward, backward = rows
    assert (forward["op"], forward["case"]) == ("forward", CASE)
    assert forward["ratio"] == pytest.approx(0.8)
    assert forward["bandwidth"] == pytest.approx(3e12)
    assert forward["fraction"] == pytest.approx(0.75)
    assert backward["ratio"] == pytest.approx(2.0)
    assert backward["fraction"] == pytest.approx(0.6)
    assert [o["name"] for o in others] == [
        "test_roofline_copy",
        "test_first_call_compiles[float32]",
        f"test_add_relu_forward[fastbn-separate-{CASE}]",
    ]


def _results(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT, encoding="utf-8")
    counts, failures = gpu_check.parse_junit(path)
    return [
        StepResult("CUDA tests (tests/cuda)", "python -m pytest tests/cuda", "failed", 1, 42.0, 200.0, counts,
                   failures),
        StepResult("torch interop (tests/cuda/test_cuda_torch.py)", "python -m pytest tests/cuda/test_cuda_torch.py",
                   "passed", 0, 5.0, 70.0, {"tests": 3, "passed": 3, "failed": 0, "errors": 0, "skipped": 0}),
        StepResult("GPU benchmarks (bench/bench_gpu.py)", "python -m pytest bench -k bench_gpu", "timed out", -2,
                   190.0, 180.0, note="Interrupted after its 180 s timeout", tail="...\nKeyboardInterrupt"),
    ]  # fmt: skip


def test_report_lists_device_steps_failures_and_the_table(tmp_path):
    report = gpu_check.render_report(DEVICE, VERSIONS, _results(tmp_path), BENCHMARK)
    lines = report.splitlines()
    assert lines[0] == "# fastbn gpu-check"
    assert "**Result: FAILED**" in lines
    for expected in (
        "- GPU: NVIDIA H200",
        "- compute capability: 9.0",
        "- memory: 150.0 GiB",
        "- L2 cache: 60 MiB",
        "- CUDA driver (API version): 13.0",
        "- numba-cuda: 0.30.4",
        "- git commit: 1e0a178",
    ):
        assert expected in lines, expected  # fmt: skip
    assert "| CUDA tests (tests/cuda) | failed | 1 | 1 | 1 | 1 | 42 s of 200 s |" in lines
    assert "| torch interop (tests/cuda/test_cuda_torch.py) | passed | 3 | 0 | 0 | 0 | 5 s of 70 s |" in lines
    assert "| GPU benchmarks (bench/bench_gpu.py) | timed out | - | - | - | - | 190 s of 180 s |" in lines
    assert "- `tests.cuda.test_cuda_backend::test_backward[nhwc]: AssertionError: max error 3e-2 > 1e-3`" in lines
    assert "Interrupted after its 180 s timeout." in lines and "KeyboardInterrupt" in lines
    assert lines.count("### torch interop (tests/cuda/test_cuda_torch.py): passed") == 0  # passed: no section
    roofline = "Copy roofline: 4000 GB/s, the best of 10 event-timed device-to-device copies of 1024 MiB"
    assert any(line.startswith(roofline + " (L2 cache: 60 MiB), measured in this run") for line in lines)
    assert f"| forward | {CASE} | 100.0 µs | 125.0 µs | 0.80 | 3000 GB/s | 75% |" in lines
    assert f"| backward | {CASE} | 200.0 µs | 100.0 µs | 2.00 | 2400 GB/s | 60% |" in lines
    assert "| test_first_call_compiles[float32] | first call (compilation) | 4.20 s | 30 |" in lines


def test_report_without_benchmarks_and_all_passed():
    result = StepResult("CUDA tests (tests/cuda)", "pytest", "passed", 0, 1.0, 10.0, None)
    report = gpu_check.render_report({}, {"fastbn": "0.9.0"}, [result], None)
    assert "**Result: PASSED**" in report
    assert "No benchmark figures" in report


def test_missing_checkout_is_reported(tmp_path):
    steps = gpu_check.plan_steps(tmp_path, tmp_path / "out", quick=True)
    assert [step.missing is not None for step in steps] == [True, True, True]
    assert "installed from a wheel" in steps[0].missing
    results = gpu_check.run_steps(steps, 10.0, tmp_path, dict(os.environ), tmp_path, say=lambda *a, **k: None)
    assert [result.status for result in results] == ["missing"] * 3
    report = gpu_check.render_report({}, {}, results, None)
    assert "does not exist (fastbn seems to be installed from a wheel" in report


def test_the_benchmark_step_collects_bench_gpu_once():
    steps = gpu_check.plan_steps(gpu_check.repository_root(), gpu_check.repository_root() / "gpu-check")
    bench = steps[-1].argv
    assert "bench/bench_gpu.py" not in bench and bench[3:6] == ["bench", "-k", "bench_gpu"]
    assert steps[0].argv[3] == "tests/cuda" and f"--ignore={gpu_check.TORCH_TESTS}" in steps[0].argv


# ---------------------------------------------------------------- the budget ---


def test_step_timeout_shares_what_is_left():
    assert gpu_check.step_timeout(480, 0.45, 1.0) == pytest.approx(216)
    # the first step used less than its share: the next ones share the rest in proportion
    assert gpu_check.step_timeout(400, 0.15, 0.55) == pytest.approx(400 * 0.15 / 0.55)
    assert gpu_check.step_timeout(100, 0.40, 0.40) == pytest.approx(100)
    assert gpu_check.step_timeout(-3, 0.40, 0.40) == 0.0


def test_a_step_past_its_timeout_is_reported_timed_out(tmp_path):
    sleeper = Step("sleeper", [sys.executable, "-S", "-c", "import time; time.sleep(5)"], share=1.0)
    start = time.monotonic()
    result = gpu_check.run_step(sleeper, 1.0, tmp_path, dict(os.environ), tmp_path / "sleeper.log")
    assert time.monotonic() - start < 4
    assert result.status == "timed out"
    assert "Interrupted after its 1 s timeout" in result.note
    assert "KeyboardInterrupt" in result.tail  # SIGINT first: a pytest step still writes its results


def test_the_budget_runs_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.25)
    steps = [
        Step("sleeper", [sys.executable, "-S", "-c", "import time; time.sleep(5)"], share=1.0),
        Step("quick", [sys.executable, "-S", "-c", "pass"], share=1.0),
    ]
    results = gpu_check.run_steps(steps, 2.0, tmp_path, dict(os.environ), tmp_path, say=lambda *a, **k: None)
    assert [result.status for result in results] == ["timed out", "passed"]
    # half the budget less the grace, then what is left less the grace
    assert results[0].timeout_s == pytest.approx(0.75, abs=0.05)
    assert 0.5 < results[1].timeout_s <= 2.0 - results[0].seconds - 0.25 + 0.01
    report = gpu_check.render_report({}, {}, results, None)
    assert "| sleeper | timed out |" in report and "| quick | passed |" in report
