"""``python -m fastbn gpu-check``: the CUDA tests on hardware, the GPU benchmark, and a Markdown report.

The CUDA backend is tested in CI only under Numba's CUDA simulator, which runs
kernels as Python threads on the CPU: it checks the indexing and the numerics,
not the hardware (warp scheduling, real shuffles, the CUDA Array Interface of
PyTorch's tensors) and says nothing about speed.  This command is what someone
with an NVIDIA GPU runs to check both, in one go, within a fixed time budget
(8 minutes; 4 with ``--quick``), from a source checkout:

1. ``FASTBN_GPU_TESTS=1 python -m pytest tests/cuda`` (without test_cuda_torch.py),
   the CUDA test suite on the first GPU;
2. tests/cuda/test_cuda_torch.py on its own: fastbn on PyTorch's CUDA tensors;
3. bench/bench_gpu.py under pytest-benchmark: fastbn against cuDNN and against the
   copy roofline, timed with CUDA events.

Each step is a child process with its own timeout, its share of what is left of
the budget (time a step does not use passes to the steps after it).  A step
that runs out of time is interrupted (SIGINT, so that pytest still writes the
results it has) and reported as timed out; the other steps still run.  Per-test
results come from pytest's JUnit XML, the figures from pytest-benchmark's JSON;
:func:`render_report` turns them, with the device's description and the
versions, into the report (``gpu-check/report.md``, or under ``--out``).  The
report writer is a pure function of those results, so it is tested without a
GPU.

Exit status: 0 if every step passed, 1 if any failed, timed out or could not
run (no tests/ or bench/ beside the package: an install from a wheel), 2 if
there is no GPU -- numba-cuda missing, no usable driver or device, or the CUDA
simulator switched on -- in which case nothing is run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The whole run's time budget in seconds, and with ``--quick``.
BUDGET_S = 480.0
QUICK_BUDGET_S = 240.0
#: Seconds an interrupted step is given to write its results before it is killed.
GRACE_S = 10.0
#: Seconds for the device description (a child process that creates a CUDA context).
PROBE_TIMEOUT_S = 60.0
#: The torch interop tests: their own step, so their own line in the report.
TORCH_TESTS = "tests/cuda/test_cuda_torch.py"
#: ``--quick``'s benchmarks: one shape, the roofline; no compilation or fused-form figures.
QUICK_BENCH = "bench_gpu and (nchw-64x64x56x56-f32 or roofline) and not add_relu and not first_call"


@dataclasses.dataclass
class Step:
    """One child process of the check.

    Parameters
    ----------
    name : str
        Its line in the report.
    argv : list of str
        The command, run from the repository root.
    share : float
        Its weight in the budget: its timeout is this fraction of the remaining shares' total
        of the time left when it starts.
    junit : Path or None
        Where pytest writes its JUnit XML (``--junitxml``), for per-test results.
    benchmark_json : Path or None
        Where pytest-benchmark writes its figures (``--benchmark-json``).
    missing : str or None
        Why the step cannot run (its files are absent); it is then reported, not run.
    empty_ok : bool
        Whether "no tests collected" (pytest's exit status 5) counts as passing.
    """

    name: str
    argv: list[str]
    share: float
    junit: Path | None = None
    benchmark_json: Path | None = None
    missing: str | None = None
    empty_ok: bool = False


@dataclasses.dataclass
class StepResult:
    """What one step did: its status, exit code, time and (from its JUnit XML) per-test results.

    ``status`` is one of ``"passed"``, ``"failed"``, ``"timed out"`` and ``"missing"``
    (not run: see ``note``).  ``counts`` has ``tests``, ``passed``, ``failed``, ``errors``
    and ``skipped`` when the JUnit XML was read; ``failures`` names the failed and erroring
    tests with the first line of their message; ``tail`` is the end of the step's output,
    kept for steps that did not pass.
    """

    name: str
    command: str
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    counts: dict[str, int] | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    note: str = ""
    tail: str = ""
    log: str = ""


# ------------------------------------------------------------------ is there a GPU? ---


def gpu_absent_reason() -> str | None:
    """Why this machine cannot run the check, as one paragraph; ``None`` when a GPU is usable.

    The simulator is checked first, from the environment, before Numba is imported
    (numba-cuda reads ``NUMBA_ENABLE_CUDASIM`` once, when it is first imported).
    """
    tail = " Nothing was run; gpu-check needs a machine with an NVIDIA GPU."
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if not simulated and "numba.cuda" in sys.modules:
        simulated = bool(getattr(sys.modules["numba.cuda"].config, "ENABLE_CUDASIM", False))
    if simulated:
        return (
            "No GPU: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1), so numba-cuda would run the kernels "
            "as Python threads on the CPU, where a hardware test run and GPU timings mean nothing. Unset "
            "NUMBA_ENABLE_CUDASIM to use a real GPU." + tail
        )
    if importlib.util.find_spec("numba_cuda") is None:
        return (
            "No GPU support: numba-cuda, fastbn's CUDA target, is not installed, so no GPU can be used "
            "(Numba's own deprecated CUDA target does not compile fastbn's kernels). Install it with "
            "pip install 'fastbn[cuda]'." + tail
        )
    try:
        from numba import cuda
    except Exception as exc:  # a broken install: the driver bindings or numba itself do not import
        return f"No GPU support: numba-cuda is installed but does not import ({type(exc).__name__}: {exc})." + tail
    if cuda.is_available():
        return None
    from importlib.metadata import version

    try:
        error = str(cuda.cuda_error() or "").strip().splitlines()
    except Exception as exc:  # an older numba-cuda without cuda_error
        error = [str(exc)]
    found = f" (numba-cuda says: {error[0]})" if error else ""
    return (
        f"No GPU: numba-cuda {version('numba-cuda')} is installed, but numba.cuda.is_available() is false: "
        f'no usable NVIDIA driver or CUDA device was found{found}. `python -c "from numba import cuda; '
        'cuda.detect()"` lists what the driver sees.' + tail
    )


# ------------------------------------------------------------------ the steps ---


def repository_root() -> Path:
    """The directory above the fastbn package: a source checkout's root, where tests/ and bench/ are."""
    import fastbn

    return Path(fastbn.__file__).resolve().parent.parent


def plan_steps(root: Path, out: Path, quick: bool = False, python: str = sys.executable) -> list[Step]:
    """The three steps (see the module docstring), their commands run from ``root``, their results under ``out``."""

    def pytest(*arguments: str) -> list[str]:
        return [python, "-m", "pytest", *arguments, "-q", "-p", "no:cacheprovider"]

    wheel = " (fastbn seems to be installed from a wheel: gpu-check needs a source checkout)"
    steps = []
    tests = root / "tests" / "cuda"
    junit = out / "cuda-tests.xml"
    steps.append(
        Step(
            "CUDA tests (tests/cuda)",
            pytest("tests/cuda", f"--ignore={TORCH_TESTS}", f"--junitxml={junit}"),
            share=0.45,
            junit=junit,
            missing=None if tests.is_dir() else f"{tests} does not exist{wheel}",
        )
    )
    junit = out / "torch-tests.xml"
    torch_tests = root / TORCH_TESTS
    steps.append(
        Step(
            "torch interop (tests/cuda/test_cuda_torch.py)",
            pytest(TORCH_TESTS, f"--junitxml={junit}"),
            share=0.15,
            junit=junit,
            missing=None
            if torch_tests.is_file()
            else f"{torch_tests} does not exist" + ("" if tests.is_dir() else wheel),
            empty_ok=True,
        )
    )
    junit, figures = out / "benchmarks.xml", out / "benchmark.json"
    bench = root / "bench" / "bench_gpu.py"
    # The directory, selected with -k: bench/conftest.py collects bench_*.py itself, and a file named on the
    # command line would be collected a second time by pytest (see bench/bench_gpu.py's docstring).
    steps.append(
        Step(
            "GPU benchmarks (bench/bench_gpu.py)",
            pytest(
                "bench",
                "-k",
                QUICK_BENCH if quick else "bench_gpu",
                "--benchmark-only",
                f"--benchmark-json={figures}",
                f"--junitxml={junit}",
            ),
            share=0.40,
            junit=junit,
            benchmark_json=figures,
            missing=None if bench.is_file() else f"{bench} does not exist{wheel}",
        )
    )
    return steps


def step_timeout(left_s: float, share: float, shares_left: float) -> float:
    """A step's timeout: its share of the time left, the shares of the steps still to run being ``shares_left``.

    Time an earlier step did not use is thus spread over the later ones, and the steps together never run
    past the budget.
    """
    if left_s <= 0 or shares_left <= 0:
        return 0.0
    return left_s * min(1.0, share / shares_left)


def _stop(process: subprocess.Popen[str]) -> None:
    """Interrupt the step's process group (pytest then writes its results), kill it if it does not exit."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def run_step(step: Step, timeout_s: float, cwd: Path, env: dict[str, str], log: Path) -> StepResult:
    """Run one step in its own process group, its output to ``log``; interrupt it after ``timeout_s``."""
    command = shlex.join(step.argv)
    if step.missing:
        return StepResult(step.name, command, "missing", note=step.missing)
    if timeout_s <= 0:
        return StepResult(step.name, command, "timed out", note="No time left in the budget: not started")
    for path in (step.junit, step.benchmark_json):
        if path is not None and path.exists():
            path.unlink()  # a stale file from an earlier run must not be read as this run's
    start = time.monotonic()
    timed_out = False
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(
            step.argv, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(process)
    seconds = time.monotonic() - start
    result = StepResult(step.name, command, "failed", process.returncode, seconds, timeout_s, log=str(log))
    if step.junit is not None and step.junit.exists():
        try:
            result.counts, result.failures = parse_junit(step.junit)
        except ElementTree.ParseError as exc:
            result.note = f"unreadable JUnit XML {step.junit}: {exc}"
    if timed_out:
        result.status = "timed out"
        result.note = f"Interrupted after its {timeout_s:.0f} s timeout" + (
            "; the counts are of the tests finished by then" if result.counts else ""
        )
    elif process.returncode == 0 and not (result.counts and (result.counts["failed"] or result.counts["errors"])):
        result.status = "passed"
    elif process.returncode == 5 and step.empty_ok:
        result.status = "passed"
        result.note = "No tests collected"
    if result.status != "passed":
        text = Path(log).read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
        result.tail = "\n".join(text[-15:])
    return result


def run_steps(
    steps: Sequence[Step], budget_s: float, cwd: Path, env: dict[str, str], out: Path, say: Any = print
) -> list[StepResult]:
    """Run the steps in order within ``budget_s`` seconds in all; return their results.

    Each step's timeout is its share of the time left (:func:`step_timeout`) less ``GRACE_S``, the time an
    interrupted step is given to write its results, so that even a step that times out ends within its share.
    """
    deadline = time.monotonic() + budget_s
    results = []
    for index, step in enumerate(steps):
        shares_left = sum(later.share for later in steps[index:] if not later.missing)
        # Less the grace an interrupted step is given: the step ends within its share even when it times out.
        timeout = max(0.0, step_timeout(deadline - time.monotonic(), step.share, shares_left) - GRACE_S)
        if not step.missing:
            say(f"[gpu-check] {step.name}: up to {timeout:.0f} s: {shlex.join(step.argv)}", flush=True)
        log = out / f"{step.junit.stem if step.junit else f'step{index}'}.log"
        result = run_step(step, timeout, cwd, env, log)
        say(f"[gpu-check] {step.name}: {result.status} ({result.seconds:.0f} s)", flush=True)
        results.append(result)
    return results


def parse_junit(path: Path | str) -> tuple[dict[str, int], list[str]]:
    """Counts (``tests``, ``passed``, ``failed``, ``errors``, ``skipped``) and failures from pytest's JUnit XML.

    Each failure reads ``classname::name: first line of the message``; collection errors
    (a testcase named after the module) are listed too.  The test that was running when a
    timed-out step was interrupted is not counted (pytest writes it without a name or outcome).
    """
    root = ElementTree.parse(path).getroot()
    counts = dict(tests=0, passed=0, failed=0, errors=0, skipped=0)
    failures = []
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # the test an interrupt stopped: pytest writes it as an empty, nameless testcase
        counts["tests"] += 1
        test = "::".join(part for part in (case.get("classname", ""), case.get("name", "")) if part)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    message = (child.get("message") or child.text or "").strip().splitlines()
                    failures.append(f"{test}: {message[0][:200]}" if message else test)
                break
        counts[outcome] += 1
    return counts, failures


# ------------------------------------------------------------------ facts about the run ---

_PROBE = r"""
import json
info = {}
try:
    from numba import cuda
    from numba.cuda.cudadrv import driver, runtime
    device = cuda.get_current_device()
    name = device.name
    info["name"] = name.decode() if isinstance(name, bytes) else str(name)
    info["compute_capability"] = ".".join(map(str, device.compute_capability))
    info["memory_bytes"] = int(cuda.current_context().get_memory_info()[1])
    info["multiprocessors"] = int(device.MULTIPROCESSOR_COUNT)
    info["l2_bytes"] = int(device.L2_CACHE_SIZE)
    info["driver_version"] = ".".join(map(str, driver.driver.get_version()))
    info["cuda_runtime_version"] = ".".join(map(str, runtime.runtime.get_version()))
except Exception as exc:
    info["numba_error"] = f"{type(exc).__name__}: {exc}"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
        info["cudnn_version"] = torch.backends.cudnn.version()
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def describe_device(timeout_s: float = PROBE_TIMEOUT_S, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The GPU's name, compute capability, memory, driver and CUDA versions (numba-cuda; PyTorch's where present).

    Asked in a child process, with a timeout, so that this process never holds a CUDA context while the
    steps run and a hung driver cannot hang the check.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the device description timed out after {timeout_s:.0f} s"}
    except (ValueError, IndexError):
        return {"probe_error": f"the device description failed: {proc.stderr.strip()[-300:]}"}


def versions(root: Path) -> dict[str, str]:
    """fastbn's, numba's, numba-cuda's, PyTorch's and pytest-benchmark's versions, and the git commit if any."""
    from importlib.metadata import PackageNotFoundError, version

    import fastbn
    from fastbn.tools.provenance import git_commit

    found = {"fastbn": fastbn.__version__}
    for package in ("numba", "numba-cuda", "torch", "pytest-benchmark"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    commit = git_commit(root)
    if commit is not None:
        found["git commit"] = commit
    return found


# ------------------------------------------------------------------ the report (pure) ---


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{1e6 * seconds:.1f} µs" if seconds < 1e-3 else f"{1e3 * seconds:.3f} ms"


def _bytes(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def benchmark_rows(benchmark: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float | None]:
    """Split pytest-benchmark's JSON into the comparison table's rows, the other figures, and the roofline.

    A row pairs, for one operation (``extra_info["op"]``) and shape (``extra_info["case"]``),
    fastbn's figure with cuDNN's (``impl`` ``"fastbn"`` and ``"cudnn"``): their medians (seconds),
    ``ratio`` fastbn/cuDNN, ``bandwidth`` (``min_bytes_moved`` over fastbn's median, bytes/s) and
    ``fraction`` of the roofline.  The roofline (bytes/s) is the copy's best bandwidth measured in the
    same run (``test_roofline_copy``'s ``best_bytes_per_s``, else a fastbn figure's
    ``roofline_bytes_per_s``).  Every other figure (the roofline's own, first calls, separate forms,
    figures without labels) is returned in the second list as ``name``, ``group``, ``median``, ``rounds``.
    """
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    others = []
    roofline = None
    for figure in benchmark.get("benchmarks", []):
        info = figure.get("extra_info", {})
        median = float(figure["stats"]["median"])
        impl, op, case = info.get("impl"), info.get("op"), info.get("case")
        if impl == "roofline" and info.get("best_bytes_per_s"):
            roofline = float(info["best_bytes_per_s"])
        if impl in ("fastbn", "cudnn") and op and case and op != "first call":
            row = pairs.setdefault((op, case), {"op": op, "case": case})
            row[impl] = median
            if impl == "fastbn":
                row["min_bytes_moved"] = info.get("min_bytes_moved")
                if roofline is None and info.get("roofline_bytes_per_s"):
                    roofline = float(info["roofline_bytes_per_s"])
        else:
            others.append(
                {
                    "name": figure.get("name", "?"),
                    "group": figure.get("group") or "",
                    "median": median,
                    "rounds": figure["stats"].get("rounds"),
                }
            )
    rows = list(pairs.values())
    for row in rows:
        fast, cudnn, moved = row.get("fastbn"), row.get("cudnn"), row.get("min_bytes_moved")
        row["ratio"] = fast / cudnn if fast and cudnn else None
        row["bandwidth"] = moved / fast if fast and moved else None
        row["fraction"] = row["bandwidth"] / roofline if row["bandwidth"] and roofline else None
    return rows, others, roofline


def _device_lines(device: dict[str, Any]) -> list[str]:
    labels = [
        ("name", "GPU"),
        ("compute_capability", "compute capability"),
        ("memory_bytes", "memory"),
        ("multiprocessors", "multiprocessors"),
        ("l2_bytes", "L2 cache"),
        ("driver_version", "CUDA driver (API version)"),
        ("cuda_runtime_version", "CUDA runtime (numba-cuda)"),
        ("torch_cuda", "PyTorch built for CUDA"),
        ("cudnn_version", "cuDNN (PyTorch's)"),
        ("numba_error", "numba-cuda's description failed"),
        ("torch_error", "PyTorch's description failed"),
        ("probe_error", "device description failed"),
    ]
    lines = []
    for key, label in labels:
        if device.get(key) is not None:
            value = device[key]
            if key in ("memory_bytes", "l2_bytes"):
                value = _bytes(float(value))
            value = " ".join(str(value).split())  # a driver's multi-line error, on one line
            lines.append(f"- {label}: {value}")
    return lines


def render_report(
    device: dict[str, Any],
    found_versions: dict[str, str],
    results: Sequence[StepResult],
    benchmark: dict[str, Any] | None,
    budget_s: float = BUDGET_S,
) -> str:
    """The Markdown report of a gpu-check run, from its collected results alone (no GPU needed).

    Parameters
    ----------
    device : dict
        :func:`describe_device`'s description.
    found_versions : dict
        :func:`versions`'s packages and commit.
    results : sequence of StepResult
        The steps, in order, with their JUnit counts and failures already read.
    benchmark : dict or None
        pytest-benchmark's JSON (``--benchmark-json``), ``None`` if the benchmarks wrote none.
    budget_s : float
        The run's time budget, stated in the report.

    Returns
    -------
    str
        The report: device, versions, one line per step (status, counts, failures), then the
        benchmark table (fastbn against cuDNN and against the copy roofline) and the other figures.
    """
    passed = all(result.status == "passed" for result in results)
    lines = ["# fastbn gpu-check", "", f"**Result: {'PASSED' if passed else 'FAILED'}**", "", "## Device", ""]
    lines += _device_lines(device) or ["- (not described)"]
    lines += ["", "## Versions", ""]
    lines += [f"- {name}: {value}" for name, value in found_versions.items()]
    lines += ["", f"## Steps (budget {budget_s:.0f} s)", ""]
    lines += ["| step | status | passed | failed | errors | skipped | time |", "|---|---|---|---|---|---|---|"]
    for result in results:
        counts = result.counts or {}
        cells = [str(counts[key]) if key in counts else "-" for key in ("passed", "failed", "errors", "skipped")]
        spent = f"{result.seconds:.0f} s of {result.timeout_s:.0f} s" if result.status != "missing" else "-"
        lines.append(f"| {result.name} | {result.status} | {' | '.join(cells)} | {spent} |")
    for result in results:
        if result.status == "passed" and not result.note:
            continue
        lines += ["", f"### {result.name}: {result.status}"]
        if result.note:
            lines += ["", f"{result.note}."]
        if result.command and result.status != "missing":
            status = f" (exit status {result.returncode})" if result.returncode is not None else ""
            lines += ["", f"Command: `{result.command}`{status}"]
        if result.failures:
            lines += ["", "Failed:", ""] + [f"- `{name}`" for name in result.failures]
        if result.tail and not result.failures:
            lines += ["", "End of its output:", "", "```", result.tail, "```"]
    lines += ["", "## Benchmarks", ""]
    if not benchmark:
        lines.append("No benchmark figures (the benchmark step wrote no JSON).")
        return "\n".join(lines) + "\n"
    rows, others, roofline = benchmark_rows(benchmark)
    copy: dict[str, Any] = next(
        (f["extra_info"] for f in benchmark.get("benchmarks", []) if f.get("extra_info", {}).get("impl") == "roofline"),
        {},
    )
    if roofline:
        what = f"{copy.get('repeats', 'several')} event-timed device-to-device copies of " + (
            f"{copy['case']}" if copy.get("case") else "a buffer"
        )
        l2 = f" (L2 cache: {_bytes(float(copy['l2_bytes']))})" if copy.get("l2_bytes") else " larger than the L2 cache"
        lines.append(
            f"Copy roofline: {roofline / 1e9:.0f} GB/s, the best of {what}{l2}, measured in this run "
            "(bytes read + written over time)."
        )
    else:
        lines.append("Copy roofline: not measured in this run.")
    lines += [
        "",
        "Medians of CUDA-event times, one call per round, L2 evicted before each round. fastbn / cuDNN < 1: "
        "fastbn is faster. Bandwidth: the bytes fastbn's passes must move at least over its median time; "
        "of roofline: that bandwidth over the copy's.",
        "",
        "| operation | shape | fastbn | cuDNN | fastbn / cuDNN | fastbn bandwidth | of roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fast, cudnn = row.get("fastbn"), row.get("cudnn")
        cells = [
            row["op"],
            row["case"],
            _time(fast) if fast else "-",
            _time(cudnn) if cudnn else "-",
            f"{row['ratio']:.2f}" if row["ratio"] else "-",
            f"{row['bandwidth'] / 1e9:.0f} GB/s" if row["bandwidth"] else "-",
            f"{100 * row['fraction']:.0f}%" if row["fraction"] else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if others:
        lines += ["", "Other figures:", "", "| figure | group | median | rounds |", "|---|---|---|---|"]
        lines += [f"| {o['name']} | {o['group']} | {_time(o['median'])} | {o['rounds']} |" for o in others]
    machine = benchmark.get("machine_info", {})
    if machine.get("cpu", {}).get("brand_raw"):
        lines += ["", f"Host CPU: {machine['cpu']['brand_raw']}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the command ---


def add_parser(commands: Any) -> Any:
    """Add the ``gpu-check`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "gpu-check",
        help="run the CUDA tests and the GPU benchmark on this machine's GPU; write a Markdown report",
        description=__doc__.split("\n\n")[0]
        + f" Within {BUDGET_S / 60:.0f} minutes in all; exit status 0 if every step passed, 1 if not, "
        "2 if there is no GPU (nothing is run).",
    )
    parser.add_argument(
        "--out",
        default="gpu-check",
        help="directory for report.md, the logs, JUnit XML and benchmark JSON (default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"benchmark one shape only (no compilation or fused-form figures), in {QUICK_BUDGET_S / 60:.0f} minutes",
    )
    return parser


def run(args: Any) -> int:
    """Check for a GPU, run the steps, write the report; return the exit status (0, 1 or 2)."""
    reason = gpu_absent_reason()
    if reason is not None:
        print(f"python -m fastbn gpu-check: {reason}", file=sys.stderr)
        return 2
    budget = QUICK_BUDGET_S if args.quick else BUDGET_S
    start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = repository_root()
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    env["FASTBN_GPU_TESTS"] = "1"
    device = describe_device(min(PROBE_TIMEOUT_S, budget / 8), env)
    (out / "device.json").write_text(json.dumps(device, indent=2) + "\n", encoding="utf-8")
    print(f"[gpu-check] {device.get('name', 'GPU')}, repository root {root}", flush=True)
    found_versions = versions(root)
    steps = plan_steps(root, out, args.quick)
    for step in steps:
        if step.missing:
            print(f"[gpu-check] {step.name}: cannot run: {step.missing}", file=sys.stderr)
    results = run_steps(steps, budget - (time.monotonic() - start), root, env, out)
    figures = None
    figures_path = steps[-1].benchmark_json
    if figures_path is not None and figures_path.exists():
        try:
            figures = json.loads(figures_path.read_text(encoding="utf-8"))
        except ValueError:
            figures = None
    report = render_report(device, found_versions, results, figures, budget)
    (out / "report.md").write_text(report, encoding="utf-8")
    print(f"[gpu-check] wrote {out / 'report.md'} ({time.monotonic() - start:.0f} s in all)")
    return 0 if all(result.status == "passed" for result in results) else 1
