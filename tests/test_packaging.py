"""Packaging: the version, the ``fastbn`` command, the sdist, and the errors for a missing optional part.

Building a wheel and installing it into a fresh virtual environment needs the
package registry, so it is not done here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

import pytest

import fastbn

ROOT = Path(__file__).resolve().parent.parent

#: What the sdist must carry besides fastbn/: every file under these folders (the test suite, and
#: the examples, benchmarks and images that its tests run or the README shows) ...
TREES = ("tests", "examples", "bench", "docs")
#: ... and these files (test_readme.py reads the README and .ci/run).
FILES = ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", ".ci/run")
#: Build and cache output that is not source.
SKIPPED_DIRS = {
    "__pycache__",
    ".git",
    ".venv",
    ".hypothesis",
    ".benchmarks",
    ".pytest_cache",
    "build",
    "dist",
    "out",
    "_build",
}
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc")


def _python(code, *, hidden=(), cwd=None, env=None, timeout=120):
    """Run ``code`` in a fresh interpreter in which the modules ``hidden`` cannot be imported."""
    prelude = f"import sys\nfor _name in {list(hidden)!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------- version ---
def test_version_is_single_sourced(tmp_path):
    """pyproject.toml takes the version from fastbn/__init__.py, where it is a literal that setuptools
    reads without importing fastbn; the installed metadata says the same."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastbn.__version__"}
    tree = ast.parse((ROOT / "fastbn" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [fastbn.__version__]
    # Run outside the source tree, whose fastbn.egg-info (left by a build) would answer first.
    proc = _python(
        "import importlib.metadata, fastbn\nprint(importlib.metadata.version('fastbn'), fastbn.__version__)",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    installed, source = proc.stdout.split()
    assert installed == source == fastbn.__version__, "the installed metadata is stale: pip install -e ."


def test_fastbn_command_prints_the_version():
    """The ``fastbn`` console script is ``python -m fastbn``'s main, and ``--version`` prints the version."""
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="fastbn")
    assert entry.value == "fastbn.tools.cli:main"
    script = shutil.which("fastbn", path=sysconfig.get_path("scripts")) or shutil.which("fastbn")
    assert script, "no fastbn command installed: pip install -e ."
    expected = f"fastbn {fastbn.__version__}"
    for command in ([script, "--version"], [sys.executable, "-m", "fastbn", "--version"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == expected, (command, proc.stdout, proc.stderr)
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fastbn ") and "ptx" in proc.stdout, proc.stdout


# --------------------------------------------------------------- sdist ---
def _source_files(root):
    """Source files under ``root``, relative, without build and cache output."""
    found = set()
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if not name.endswith(SKIPPED_SUFFIXES):
                found.add(Path(directory, name).relative_to(root).as_posix())
    return found


def _copy_source(destination):
    """The source tree without build and cache output (a build writes fastbn.egg-info into it)."""

    def ignore(directory, names):
        return [n for n in names if n in SKIPPED_DIRS or n.endswith(".egg-info") or n.endswith(SKIPPED_SUFFIXES)]

    shutil.copytree(ROOT, destination, ignore=ignore)


_BUILD_SDIST = """
import json, sys, warnings
from setuptools import build_meta
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = build_meta.build_sdist(sys.argv[1])
print(json.dumps({"sdist": name, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_sdist_carries_the_test_suite(tmp_path):
    """The sdist holds LICENSE and every file the tests import or read, so that the suite runs from it;
    setuptools builds it without a warning."""
    pytest.importorskip("setuptools")
    source, out = tmp_path / "source", tmp_path / "dist"
    _copy_source(source)
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SDIST, str(out)], cwd=source, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["warnings"] == [], report["warnings"]
    assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("warning:")], proc.stdout

    with tarfile.open(out / report["sdist"]) as sdist:
        members = {m.name.partition("/")[2]: m for m in sdist.getmembers() if m.isfile()}
        pkg_info = sdist.extractfile(members["PKG-INFO"]).read().decode()
        license_text = sdist.extractfile(members["LICENSE"]).read().decode()
    expected = {f"{tree}/{path}" for tree in TREES for path in _source_files(ROOT / tree)}
    expected |= set(FILES) | {f"fastbn/{path}" for path in _source_files(ROOT / "fastbn") if path.endswith(".py")}
    assert not expected - set(members), f"missing from the sdist: {sorted(expected - set(members))}"
    # Every module that a test file imports from the test folders (oracle, strategies, gpu_arrays, ...).
    local = {p.stem: p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
    for path in [p for p in members if p.startswith("tests/") and p.endswith(".py")]:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                top = (name or "").partition(".")[0]
                assert top not in local or local[top] in members, (path, name)

    assert f"\nVersion: {fastbn.__version__}\n" in pkg_info
    assert "\nLicense-Expression: MIT\n" in pkg_info and "\nLicense-File: LICENSE\n" in pkg_info
    assert "\nClassifier: " in pkg_info and "License ::" not in pkg_info  # no classifier beside the SPDX one
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the fastbn authors" in license_text


# ------------------------------------------- a missing optional part ---
GPU_ARRAY = """
import numpy as np
import fastbn

class ForeignGPUArray:  # a GPU array as CuPy or torch would give
    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False), "version": 3}
    shape, dtype = (4, 3), np.dtype(np.float32)

try:
    fastbn.forward(ForeignGPUArray())
except Exception as exc:
    print(type(exc).__name__, exc)
"""

IMPORT = """
try:
    import {module}
except ImportError as exc:
    print(type(exc).__name__, isinstance(exc, ModuleNotFoundError), exc)
"""

CLI = """
from fastbn.tools.cli import main
sys.exit(main({argv!r}))
"""

EXAMPLE = """
import runpy
namespace = runpy.run_path({script!r}, run_name="example")
try:
    {call}
except ImportError as exc:
    print(type(exc).__name__, isinstance(exc, ModuleNotFoundError), exc)
"""

_TRAIN_MLP = str(ROOT / "examples" / "train_mlp.py")
_TRAIN_DP = str(ROOT / "examples" / "train_data_parallel.py")


@pytest.mark.parametrize(
    "hidden, code, extra",
    [
        (["jax"], IMPORT.format(module="fastbn.jax"), "jax"),
        (["torch"], IMPORT.format(module="fastbn.torch"), "torch"),
        (["flax"], IMPORT.format(module="fastbn.flax"), "flax"),
        (["keras"], IMPORT.format(module="fastbn.keras"), "keras"),
        (["numba_cuda"], IMPORT.format(module="fastbn.backends.cuda.ops"), "cuda"),
        (["mpi4py"], EXAMPLE.format(script=_TRAIN_DP, call="namespace['main']([])"), "mpi"),
        (["tqdm"], EXAMPLE.format(script=_TRAIN_MLP, call="namespace['main'](['--out', 'OUT'])"), "examples"),
        (["sklearn"], EXAMPLE.format(script=_TRAIN_MLP, call="namespace['main'](['--out', 'OUT'])"), "examples"),
        (
            ["matplotlib"],
            EXAMPLE.format(script=_TRAIN_MLP, call="namespace['plot_curves']({}, [], 1, 'x.png')"),
            "examples",
        ),
    ],
    ids=["jax", "torch", "flax", "keras", "numba-cuda", "mpi4py", "tqdm", "scikit-learn", "matplotlib"],
)
def test_a_missing_dependency_names_its_extra(tmp_path, hidden, code, extra):
    """Importing a part whose optional dependency is missing is a ModuleNotFoundError naming the extra."""
    proc = _python(code.replace("'OUT'", repr(str(tmp_path / "out"))), hidden=hidden, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(("MissingDependency True", "ModuleNotFoundError True")), proc.stdout + proc.stderr
    assert f"pip install 'fastbn[{extra}]'" in proc.stdout, proc.stdout


def test_gpu_array_without_numba_cuda_names_the_extra():
    proc = _python(GPU_ARRAY, hidden=["numba_cuda"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ValueError backend: the CUDA backend is not available"), proc.stdout
    assert "numba-cuda" in proc.stdout and "pip install 'fastbn[cuda]'" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "hidden, argv, extra",
    [
        (["numba_cuda"], ["ptx", "--cc", "8.0", "--jobs", "1"], "cuda"),
        (["torch"], ["bench-torch"], "torch"),
        (["torch"], ["torch-suite", "--pytorch-src", "SRC"], "torch"),
    ],
    ids=["ptx", "bench-torch", "torch-suite"],
)
def test_a_command_without_its_dependency_names_the_extra(tmp_path, hidden, argv, extra):
    """``python -m fastbn`` (and ``fastbn``) commands exit with status 2 and name the extra to install."""
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_nn.py").write_text("")  # torch-suite's check of its source checkout
    argv = [str(tmp_path) if arg == "SRC" else arg for arg in argv]
    proc = _python(CLI.format(argv=argv), hidden=hidden)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"pip install 'fastbn[{extra}]'" in output and "Traceback" not in output, output


def test_ptx_without_cuda12_names_its_extra(monkeypatch):
    """Without nvidia-cuda-nvcc-cu12, ``ptx --cc 7.0`` says to install the developer extra ptx-cu12."""
    if not sys.platform.startswith("linux"):
        pytest.skip("CUDA 12's compiler is used on Linux only")
    from fastbn.tools import cuda12

    distribution = importlib.metadata.distribution

    def without_cuda12(name):
        if name == cuda12.DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_cuda12)
    toolkit, reason = cuda12.locate.__wrapped__()
    assert toolkit is None and cuda12.DISTRIBUTION in reason and "pip install 'fastbn[ptx-cu12]'" in reason, reason


def test_bench_charts_without_matplotlib_name_the_extra(monkeypatch, capsys):
    from fastbn.tools import charts

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert charts.write_charts(None, [], [], [], []) == []
    assert "pip install 'fastbn[bench]'" in capsys.readouterr().err


def test_benchmarks_without_pytest_benchmark_name_the_extra():
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = _python(
        "import pytest\nsys.exit(pytest.main(['-p', 'no:cacheprovider', '--collect-only', '-q', 'bench']))",
        hidden=["pytest_benchmark"],
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "pip install 'fastbn[bench]'" in output, output
