"""PyTorch's own batch-norm tests, run on plain torch and with fastbn swapped in.

``python -m fastbn torch-suite --pytorch-src DIR [--out FILE]`` runs the
batch-norm tests of a PyTorch source checkout (``DIR/test/...``) twice, each
file in its own pytest subprocess, on the CPU only:

1. on plain torch;
2. with torch's batch-norm names replaced by fastbn's, before any test module
   is imported (a pytest plugin, :mod:`fastbn.tools._torch_suite_plugin`,
   loaded with ``-p``, does it while pytest starts).

It then reports how many tests pass on torch, how many pass swapped, and every
test that passes on torch but fails swapped, with the first line of its
failure.  Tests that fail (or are skipped) on plain torch are left out of the
comparison: version skew between the checkout and the installed torch, or a
missing optional dependency, shows up there and says nothing about fastbn.

What is swapped, and why
------------------------
Exactly what a user replacing torch's batch norm by fastbn's would replace::

    torch.nn.BatchNorm1d / BatchNorm2d / BatchNorm3d  -> fastbn.torch.BatchNorm1d / 2d / 3d
    torch.nn.SyncBatchNorm                            -> fastbn.torch.SyncBatchNorm
    torch.nn.functional.batch_norm                    -> fastbn.torch.batch_norm

(the four classes also in ``torch.nn.modules``, the namespace ``torch.nn``
re-exports them from).

* The classes: the tests and the test databases (``module_db``,
  ``common_nn``) build modules through ``torch.nn.X`` / ``nn.X``; the
  databases capture the class when they are built, hence the swap before any
  import.  ``module_db`` names its tests after the class's name in
  ``torch.nn.modules``; swapped there as well, the swapped run's tests keep
  torch's names, so the two runs line up test by test (and any skip keyed on
  the name still applies).  fastbn's classes subclass torch's, which
  ``fastbn.torch`` captured when it was imported (before the swap).
* ``torch.nn.functional.batch_norm``: the OpInfo ``nn.functional.batch_norm``
  captures it when ``common_methods_invocations`` is built, so its tests
  (test_ops*.py, functorch) exercise fastbn.  Torch's own modules call it too:
  ``_BatchNorm.forward`` looks ``F.batch_norm`` up at every call, so whatever
  stays a torch module (``LazyBatchNorm*d``, modules built from
  ``torch.nn.modules.batchnorm`` directly, torch's ``SyncBatchNorm`` on the
  CPU) runs on fastbn as well -- as it would for a user who swapped it.
* Not swapped: ``torch.batch_norm`` and ``torch.ops.aten.*batch_norm*``.
  ``torch.batch_norm`` is the ATen operator that torch's ``F.batch_norm``
  lowers to; it has another signature (weight and bias before the running
  statistics, a ``cudnn_enabled`` flag), so no user swaps it for
  ``fastbn.torch.batch_norm``, and tests that call it (or ``native_batch_norm``
  and friends) test ATen's kernels, not the drop-in.  Hence the op-database
  files are filtered to ``nn_functional_batch_norm``.  Nor the defining
  module ``torch.nn.modules.batchnorm``: its classes are the bases of
  fastbn's, and torch's own code (lazy modules, quantization) imports them
  from there.
* The swap is a plain assignment, not a wrapper.  If ``fastbn.torch`` ever
  delegated to ``torch.nn.functional.batch_norm`` looked up at call time, it
  would recurse here -- and for a user who swapped it the same way, which is
  the point.

Selection
---------
By pytest ``-k`` (case-insensitive), per file, see :data:`DEFAULT_TARGETS`;
``--target FILE::EXPR`` replaces the list.  Device-generic tests are
instantiated for the CPU only (``PYTORCH_TESTING_DEVICE_ONLY_FOR=cpu``,
``CUDA_VISIBLE_DEVICES=''``); tests that need CUDA skip themselves, as they do
on any CPU-only machine.  A target whose file the checkout lacks is reported
and skipped (only ``test/test_nn.py`` is required).

PyTorch's ``test/conftest.py`` is not loaded (``--noconftest``): it is written
for the pytest of PyTorch's CI, and its extras (sharding, reruns, its own
junit report) are not needed here.  Results are collected by the plugin, one
JSON line per test phase.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypedDict

from fastbn._frameworks import missing_dependency

#: (test file relative to the checkout, pytest ``-k`` expression) run by default.
DEFAULT_TARGETS = (
    ("test/test_nn.py", "batchnorm or batch_norm"),
    ("test/test_modules.py", "batchnorm"),
    ("test/test_ops.py", "nn_functional_batch_norm"),
    ("test/test_ops_gradients.py", "nn_functional_batch_norm"),
    ("test/test_ops_fwd_gradients.py", "nn_functional_batch_norm"),
    ("test/test_ops_jit.py", "nn_functional_batch_norm"),
    ("test/functorch/test_ops.py", "nn_functional_batch_norm"),
    ("test/functorch/test_vmap.py", "nn_functional_batch_norm or test_batch_norm"),
    ("test/functorch/test_eager_transforms.py", "batch_norm"),
)

REQUIRED = "test/test_nn.py"
PLUGIN = "fastbn.tools._torch_suite_plugin"
PASS, FAIL, ERROR, SKIP, XFAIL, XPASS, MISSING = (
    "passed",
    "failed",
    "error",
    "skipped",
    "xfailed",
    "xpassed",
    "not run",
)
BROKEN = (FAIL, ERROR, XPASS, MISSING)

#: A test's outcome and the first line of its failure or skip message.
Outcome: TypeAlias = tuple[str, str]


class PytestRun(TypedDict):
    """What :func:`run_pytest` returns for one pytest run of one file."""

    tests: dict[str, Outcome]
    collect_errors: dict[str, str]
    returncode: int | str
    seconds: float
    log: str


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``torch-suite`` subcommand to ``python -m fastbn``'s subparsers.

    Parameters
    ----------
    commands : argparse._SubParsersAction
        The subparsers of ``python -m fastbn``.

    Returns
    -------
    argparse.ArgumentParser
        The new subcommand's parser.
    """
    parser = commands.add_parser(
        "torch-suite",
        help="run PyTorch's batch-norm tests on torch and with fastbn swapped in",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--pytorch-src",
        required=True,
        metavar="DIR",
        help="root of a PyTorch source checkout (needs DIR/test/test_nn.py)",
    )
    parser.add_argument(
        "--out", metavar="FILE", help="also write the report to FILE: JSON if it ends in .json, else the text report"
    )
    parser.add_argument(
        "--target",
        action="append",
        metavar="FILE::EXPR",
        help="a test file (relative to DIR) and its -k expression; repeat to replace the default list",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "plain", "swapped"),
        default="both",
        help="which runs to make (default both; one alone reports only its counts)",
    )
    parser.add_argument(
        "--timeout", type=float, default=7200.0, help="seconds allowed to each pytest run (default 7200)"
    )
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run (default 1: no xdist)")
    parser.add_argument("--keep", metavar="DIR", help="keep the raw JSON-lines results and pytest outputs in DIR")
    parser.add_argument(
        "--summary",
        metavar="FILE",
        help="also write the README's summary of a run of both modes to FILE (Markdown; docs/torch_suite.md, "
        "spliced into the README by python -m fastbn readme)",
    )
    return parser


def parse_targets(specs: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """``FILE::EXPR`` strings as (file, expression) pairs.

    Parameters
    ----------
    specs : list of str or None
        The ``--target`` values; None gives :data:`DEFAULT_TARGETS`.

    Returns
    -------
    tuple of (str, str)

    Raises
    ------
    ValueError
        For a spec without ``::`` or with an empty part.
    """
    if not specs:
        return DEFAULT_TARGETS
    targets: list[tuple[str, str]] = []
    for spec in specs:
        path, sep, expression = spec.partition("::")
        if not sep or not path or not expression:
            raise ValueError(f"--target {spec!r}: expected FILE::EXPR, e.g. test/test_nn.py::batchnorm")
        targets.append((path, expression))
    return tuple(targets)


def source_version(root: Path) -> str:
    """What the checkout says it is: ``version.txt`` and, if it is a git work tree, its commit.

    Parameters
    ----------
    root : pathlib.Path
        The checkout's root.

    Returns
    -------
    str
        E.g. ``"2.13.0 (git 0123abcd...)"``, or ``"unknown"``.
    """
    parts: list[str] = []
    version_file = root / "version.txt"
    if version_file.is_file():
        parts.append(version_file.read_text().strip())
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        parts.append(f"(git {commit})")
    return " ".join(parts) or "unknown"


def _environment(swap: bool, results: Path) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["FASTBN_TORCH_SUITE_SWAP"] = "1" if swap else "0"
    env["FASTBN_TORCH_SUITE_RESULTS"] = str(results)
    return env


def run_pytest(
    root: Path, test_file: str, expression: str, swap: bool, workdir: Path, timeout: float, workers: int = 1
) -> PytestRun:
    """One pytest run of one file; returns what the plugin recorded.

    Parameters
    ----------
    root : pathlib.Path
        The checkout's root; pytest runs in ``root / "test"``.
    test_file : str
        The file, relative to ``root``.
    expression : str
        The ``-k`` expression.
    swap : bool
        Run with fastbn swapped in.
    workdir : pathlib.Path
        Where the results and pytest's output are written.
    timeout : float
        Seconds before the run is killed; what it recorded until then counts.
    workers : int, default 1
        pytest-xdist workers (``-n``); 1 runs without xdist.

    Returns
    -------
    dict
        ``tests`` ({test id: (outcome, first line)}), ``collect_errors``
        ({id: message}), ``returncode``, ``seconds``, ``log`` (path of
        pytest's output).
    """
    tag = ("swapped-" if swap else "plain-") + re.sub(r"[^A-Za-z0-9]+", "_", test_file)
    results = workdir / f"{tag}.jsonl"
    log = workdir / f"{tag}.log"
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n")  # keeps the checkout's own pytest.ini (and its addopts) out
    results.unlink(missing_ok=True)
    test_dir = root / "test"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(root / test_file),
        "-k",
        expression,
        "-p",
        PLUGIN,
        "-p",
        "no:cacheprovider",
        "--noconftest",
        "-c",
        str(ini),
        "--rootdir",
        str(test_dir),
        "-q",
        "-rN",
        "--tb=line",
        "-W",
        "ignore",
    ]
    if workers > 1:
        command += ["-n", str(workers)]
    start = time.perf_counter()
    returncode: int | str
    with open(log, "w", encoding="utf-8") as out:
        try:
            returncode = subprocess.run(
                command,
                cwd=test_dir,
                env=_environment(swap, results),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    seconds = time.perf_counter() - start
    selected, phases, collect_errors = _read_results(results)
    tests = {nodeid: _outcome(phases.get(nodeid, [])) for nodeid in selected}
    for nodeid, records in phases.items():  # xdist: ids reported though listed by a worker only
        tests.setdefault(nodeid, _outcome(records))
    return {
        "tests": tests,
        "collect_errors": collect_errors,
        "returncode": returncode,
        "seconds": seconds,
        "log": str(log),
    }


def _read_results(path: Path) -> tuple[list[str], defaultdict[str, list[dict[str, Any]]], dict[str, str]]:
    selected: list[str] = []
    phases: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    collect_errors: dict[str, str] = {}
    if not path.is_file():
        return selected, phases, collect_errors
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if "selected" in record:
            selected.extend(n for n in record["selected"] if n not in selected)
        elif "collect_error" in record:
            collect_errors[record["collect_error"]] = record["message"]
        else:
            phases[record["nodeid"]].append(record)
    return selected, phases, collect_errors


def _outcome(records: Sequence[Mapping[str, Any]]) -> Outcome:
    """(outcome, first line) of one test from its phase records."""
    if not records:
        return MISSING, "no result recorded (the run crashed or timed out before it)"
    for record in records:
        if record["outcome"] == "failed":
            return (FAIL if record["when"] == "call" else ERROR), record["message"]
    for record in records:
        if record["outcome"] == "skipped":
            return (XFAIL if record["wasxfail"] else SKIP), record["message"]
    call = [r for r in records if r["when"] == "call"]
    if call and call[0]["wasxfail"]:
        return XPASS, "unexpectedly passed"
    return (PASS, "") if call else (MISSING, "no call phase recorded")


def compare(plain: Mapping[str, Outcome], swapped: Mapping[str, Outcome]) -> dict[str, dict[str, str]]:
    """Sort the tests of both runs into the report's groups.

    Parameters
    ----------
    plain, swapped : dict
        {test id: (outcome, first line)} of each run.

    Returns
    -------
    dict
        ``swapped_only_failures``: passed on torch, failed/errored/not run
        swapped, {id: first line}; ``skipped_swapped``: passed on torch,
        skipped swapped; ``xfail_changed``: xfailed on torch and not swapped;
        ``fixed_by_swap``: failed on torch, passed swapped;
        ``broken_on_torch``: {id: first line} of the tests not passing on
        torch (excluded from the comparison).
    """
    groups: dict[str, dict[str, str]] = {
        name: {}
        for name in ("swapped_only_failures", "skipped_swapped", "xfail_changed", "fixed_by_swap", "broken_on_torch")
    }
    for nodeid, (outcome, message) in plain.items():
        other, other_message = swapped.get(nodeid, (MISSING, "not collected in the swapped run"))
        if outcome in BROKEN:
            groups["broken_on_torch"][nodeid] = f"{outcome}: {message}"
            if other == PASS:
                groups["fixed_by_swap"][nodeid] = message
        elif outcome == PASS and other in BROKEN:
            groups["swapped_only_failures"][nodeid] = f"{other}: {other_message}"
        elif outcome == PASS and other in (SKIP, XFAIL):
            groups["skipped_swapped"][nodeid] = f"{other}: {other_message}"
        elif outcome == XFAIL and other != XFAIL:
            groups["xfail_changed"][nodeid] = f"{other}: {other_message}"
    return groups


def _counts(tests: Mapping[str, Outcome]) -> dict[str, int]:
    counts = Counter(outcome for outcome, _ in tests.values())
    return {"collected": len(tests), **{k: counts.get(k, 0) for k in (PASS, FAIL, ERROR, SKIP, XFAIL, XPASS, MISSING)}}


def _cause(message: str) -> str:
    """A failure's first line with numbers, shapes and ids blurred, to group alike failures."""
    text = message.split(": ", 1)[1] if message.startswith(BROKEN) else message
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return text[:160]


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the report; return a process exit code.

    Parameters
    ----------
    args : argparse.Namespace
        ``pytorch_src``, ``out``, ``target``, ``mode``, ``timeout``,
        ``workers``, ``keep`` (see :func:`add_parser`).

    Returns
    -------
    int
        0 when no test passes on torch and fails swapped, 1 when some do, 2
        for a usage error (no ``test/test_nn.py`` under ``--pytorch-src``, a
        malformed ``--target``).
    """
    root = Path(args.pytorch_src).expanduser().resolve()
    try:
        targets = parse_targets(args.target)
    except ValueError as exc:
        print(f"python -m fastbn torch-suite: error: {exc}")
        return 2
    if not (root / REQUIRED).is_file():
        print(
            f"python -m fastbn torch-suite: error: {root / REQUIRED} not found "
            "(--pytorch-src must be the root of a PyTorch source checkout)"
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="fastbn-torch-suite-") as scratch:
        workdir = Path(args.keep).resolve() if args.keep else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        report = suite(root, targets, args.mode, workdir, args.timeout, args.workers)
    text = format_report(report)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(report, indent=1) + "\n" if out.suffix == ".json" else text)
    if args.summary:
        if args.mode != "both":
            print("python -m fastbn torch-suite: --summary needs both runs (--mode both): no summary written")
        else:
            Path(args.summary).write_text(format_summary(report))
    return 1 if report["totals"].get("swapped_only_failures") else 0


def suite(
    root: Path, targets: Sequence[tuple[str, str]], mode: str, workdir: Path, timeout: float, workers: int = 1
) -> dict[str, Any]:
    """Run every target in the requested modes and compare; the report as a dict.

    Parameters
    ----------
    root : pathlib.Path
        The checkout's root.
    targets : sequence of (str, str)
        Test files and their ``-k`` expressions.
    mode : {"both", "plain", "swapped"}
        Which runs to make.
    workdir : pathlib.Path
        Where the runs write their results and logs.
    timeout : float
        Seconds allowed to each pytest run.
    workers : int, default 1
        pytest-xdist workers per run.

    Returns
    -------
    dict
        JSON-serialisable: the environment, per-target counts and groups
        (see :func:`compare`), and totals.
    """
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise missing_dependency("the torch-suite command", "PyTorch", "torch", exc) from exc

    import fastbn
    from fastbn.backends.cpu.machine import machine
    from fastbn.tools._torch_suite_plugin import SWAPPED
    from fastbn.tools.provenance import git_commit

    report: dict[str, Any] = {
        "pytorch_src": str(root),
        "source_version": source_version(root),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "fastbn": fastbn.__version__,
        "fastbn_commit": git_commit(Path(fastbn.__file__).resolve().parent.parent),
        "machine": machine().describe(),
        "python": sys.version.split()[0],
        "mode": mode,
        "swapped": [f"{m}.{a} -> fastbn.torch.{r}" for m, a, r in SWAPPED],
        "targets": [],
    }
    totals: defaultdict[str, float] = defaultdict(int)  # counts, and seconds
    for test_file, expression in targets:
        entry: dict[str, Any] = {"file": test_file, "k": expression}
        report["targets"].append(entry)
        if not (root / test_file).is_file():
            entry["absent"] = True
            continue
        runs: dict[str, PytestRun] = {}
        for name in ("plain", "swapped") if mode == "both" else (mode,):
            result = run_pytest(root, test_file, expression, name == "swapped", workdir, timeout, workers)
            runs[name] = result
            entry[name] = {
                "counts": _counts(result["tests"]),
                "returncode": result["returncode"],
                "seconds": round(result["seconds"], 1),
                "collect_errors": result["collect_errors"],
            }
            totals[f"{name}_collected"] += len(result["tests"])
            totals[f"{name}_passed"] += entry[name]["counts"][PASS]
            totals[f"{name}_seconds"] += result["seconds"]
        if mode == "both":
            groups = compare(runs["plain"]["tests"], runs["swapped"]["tests"])
            entry.update(groups)
            for name, members in groups.items():
                totals[name] += len(members)
    report["totals"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in totals.items()}
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text, one section per target, then the totals and the failures grouped by cause.

    Parameters
    ----------
    report : dict
        As returned by :func:`suite`.

    Returns
    -------
    str
    """
    lines = [
        f"PyTorch test sources: {report['pytorch_src']} (version: {report['source_version']})",
        f"torch {report['torch']} (git {report['torch_git']}), fastbn {report['fastbn']}, Python {report['python']}",
        "swapped: " + "; ".join(report["swapped"]),
        "",
    ]
    for entry in report["targets"]:
        head = f"{entry['file']}  -k {entry['k']!r}"
        if entry.get("absent"):
            lines += [head, "  absent from the checkout: skipped", ""]
            continue
        lines.append(head)
        for name in ("plain", "swapped"):
            if name in entry:
                run_entry = entry[name]
                counts = ", ".join(f"{v} {k}" for k, v in run_entry["counts"].items() if v or k == PASS)
                lines.append(f"  {name:8} {counts}  [{run_entry['seconds']} s, exit {run_entry['returncode']}]")
                for nodeid, message in run_entry["collect_errors"].items():
                    lines.append(f"    collection error {nodeid}: {message}")
        for group, title in (
            ("swapped_only_failures", "pass on torch, fail swapped"),
            ("skipped_swapped", "pass on torch, skipped swapped"),
            ("xfail_changed", "expected failure on torch, not swapped"),
            ("fixed_by_swap", "fail on torch, pass swapped"),
            ("broken_on_torch", "not passing on torch (excluded)"),
        ):
            members = entry.get(group)
            if members:
                lines.append(f"  {title}: {len(members)}")
                for nodeid, message in sorted(members.items()):
                    lines.append(f"    {nodeid.split('::', 1)[-1]}: {message}")
        lines.append("")
    totals = report["totals"]
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    causes = Counter(_cause(m) for e in report["targets"] for m in e.get("swapped_only_failures", {}).values())
    if causes:
        lines.append("swapped-only failures by first line (numbers blurred):")
        lines += [f"  {count:4}  {cause}" for cause, count in causes.most_common()]
    return "\n".join(lines) + "\n"


def format_summary(report: Mapping[str, Any]) -> str:
    """The README's summary of a run of both modes (Markdown): what ran, per file, and what failed swapped.

    Parameters
    ----------
    report : dict
        As returned by :func:`suite` with ``mode="both"``.

    Returns
    -------
    str
    """
    commit = report.get("fastbn_commit") or "no git checkout"
    lines = [
        f"PyTorch {report['source_version']}'s tests (`{report['pytorch_src']}`) against torch {report['torch']}, "
        f"fastbn {report['fastbn']} at commit {commit}, Python {report['python']}, on {report.get('machine', '?')}:",
        "",
        "| test file | -k | pass on torch | of which pass swapped | fail on torch, pass swapped |",
        "|---|---|---|---|---|",
    ]
    kept = fixed = 0
    for entry in report["targets"]:
        if entry.get("absent"):
            lines.append(f"| {entry['file']} | `{entry['k']}` | absent | | |")
            continue
        passed = entry["plain"]["counts"][PASS]
        lost = len(entry.get("swapped_only_failures", {})) + len(entry.get("skipped_swapped", {}))
        kept += passed - lost
        fixed += len(entry.get("fixed_by_swap", {}))
        lines.append(
            f"| {entry['file']} | `{entry['k']}` | {passed} | {passed - lost} | {len(entry.get('fixed_by_swap', {}))} |"
        )
    total = report["totals"].get("plain_passed", 0)
    lines += [
        "",
        f"Of the {total} tests that pass on torch, {kept} pass with fastbn swapped in "
        f"(and of those that fail on torch, {fixed} pass swapped).",
    ]
    failures = [
        (entry["file"], nodeid, message)
        for entry in report["targets"]
        for group in ("swapped_only_failures", "skipped_swapped")
        for nodeid, message in sorted(entry.get(group, {}).items())
    ]
    if failures:
        lines += ["", "Passing on torch, not swapped:", ""]
        lines += [f"- `{nodeid.split('::', 1)[-1]}` ({file}): {message[:300]}" for file, nodeid, message in failures]
    return "\n".join(lines) + "\n"
