"""The README's code and commands work as written, and its measured figures are the committed reports'.

Every fenced block of README.md is accounted for here:

* each ```python block runs, in README order, in a namespace of its own, so
  that each is self-contained as a reader would paste it (a block that uses
  a name it does not define fails).  Blocks whose imports are missing (an
  extra not installed) are skipped, naming the module.  The GPU block runs
  under Numba's CUDA simulator in a child process (NUMBA_ENABLE_CUDASIM must
  be set before Numba is imported); the MPI block runs in a child process too,
  as a one-process communicator, so that this process never initialises MPI.
* each ```bash block either runs (:data:`SHELL_RUN`: cheap, and only touches
  a scratch copy of the README and its reports) or is listed in
  :data:`SHELL_NOT_RUN` with the reason.  A new block that is in neither list
  fails :func:`test_every_shell_block_is_run_or_excused`.
* the sections between ``<!-- generated:NAME -->`` markers must equal the
  committed fragments that ``python -m fastbn readme`` copies in
  (fastbn/tools/readme.py).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from fastbn.tools import readme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


class Block(NamedTuple):
    """A fenced code block of the README: its language, the heading it sits under, its first line number."""

    lang: str
    heading: str
    line: int
    code: str

    @property
    def first_line(self):
        return self.code.strip().splitlines()[0].strip()


def readme_blocks(text=None):
    """Every fenced block of the README, in order."""
    blocks, heading, fence = [], "", None
    for number, line in enumerate((README.read_text() if text is None else text).splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence = (line[3:].strip(), number, [])
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append(Block(fence[0], heading, fence[1], "\n".join(fence[2]) + "\n"))
            fence = None
        else:
            fence[2].append(line)
    assert fence is None, f"README.md:{fence[1]}: unclosed code fence"
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang == "bash"]

#: Shell blocks run by test_shell_block_runs: a test id, and the start of the block's first line.
SHELL_RUN = {
    "plan": "python -m fastbn plan 64x64x56x56 float32",
    "readme": "python -m fastbn readme ",
}

_INSTALLS = "installs from the package registry"
#: Shell blocks not run, by the start of their first line, and why.
SHELL_NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m fastbn demo": (
        f"creates a virtual environment and {_INSTALLS}; the demo it ends with runs in "
        "test_demo_command_runs, on a small input"
    ),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test,': (
        f"{_INSTALLS} and runs the whole test suite (minutes): it is what CI runs, read out of the README "
        "by .ci/run (test_readme_names_the_test_command_that_ci_runs)"
    ),
    "pip install -e .            # numpy,": _INSTALLS,
    'pip install -e ".[cuda]"': _INSTALLS,
    'pip install -e ".[bench,torch,examples]"': (
        f"{_INSTALLS}, then runs the whole benchmark (tens of minutes); tests/test_bench_cli.py runs a short one"
    ),
    "python -m fastbn bench-fused": (
        "a benchmark of about a minute on 51 MB tensors; its report is bench/results/fused.md"
    ),
    "python -m fastbn gpu-check": (
        "needs a GPU (up to 8 minutes there); without one it exits with status 2 and runs nothing, which "
        "tests/test_gpu_check.py checks"
    ),
    'pip install -e ".[examples,mpi]"': (
        f"{_INSTALLS}; the mpiexec run of examples/train_data_parallel.py that follows is "
        "tests/test_sync.py::test_data_parallel_example_matches_single_process_training"
    ),
}


def _shell_block(prefix):
    """The one shell block whose first line starts with ``prefix``."""
    found = [b for b in SHELL if b.first_line.startswith(prefix)]
    assert len(found) == 1, f"{len(found)} README shell blocks start with {prefix!r}"
    return found[0]


# Under the simulator, numba-cuda's own device arrays (FakeCUDAArray) export no
# __cuda_array_interface__, so fastbn would take them for host arrays and run
# the block on the CPU.  cuda.to_device therefore returns fastbn's simulator
# device array instead, which exports it as a real device array does; nothing
# else in the block is changed.
_SIMULATOR_PRELUDE = """
import numpy as _np
from numba import cuda as _cuda
from fastbn.backends.cuda import target as _target

def _to_device(array, *args, **kwargs):
    array = _np.ascontiguousarray(array)
    device = _target.device_array(array.shape, array.dtype)
    device.copy_to_device(array)
    return device

_cuda.to_device = _to_device
"""

_SIMULATOR_EPILOGUE = """
assert _target.SIMULATOR
for _name in ("y", "dx", "dweight", "dbias"):
    assert _target.is_device_array(globals()[_name]), (_name, type(globals()[_name]))
assert y_host.shape == (8, 4, 4, 4) and _np.allclose(y_host.std(axis=(0, 2, 3)), 1, atol=1e-3)
assert _np.allclose(running_mean.copy_to_host(), 0.1 * x.copy_to_host().mean(axis=(0, 2, 3)), atol=1e-6)
print("ran on", _target.NAME)
"""


def _imports(code):
    """The modules a block imports, in order."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _require(code):
    for name in _imports(code):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"the README block imports {name}, which is not installed")


def _child_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run_child(code, block, **env):
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_child_env(**env)
    )
    assert proc.returncode == 0, f"README.md:{block.line} ({block.heading}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# The Keras block's check, run in its child: the model trained, the weights moved into Keras's layer.
_KERAS_EPILOGUE = """
assert len(history.history["loss"]) == 2 and all(np.isfinite(history.history["loss"]))
for ours, theirs in zip(model.layers[1].get_weights(), their_layer.get_weights()):
    assert np.array_equal(ours, theirs)
assert not np.allclose(model.layers[1].get_weights()[2], 0)  # the moving mean was updated
"""


# ------------------------------------------------------ what a block made ---
def _check_use(ns):
    x, y, dx = ns["x"], ns["y"], ns["dx"]
    assert y.shape == dx.shape == x.shape
    # The example trains with weight 1 and bias 0: each channel is standardised.
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert np.allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-3)
    assert np.allclose(np.moveaxis(ns["y_nhwc"], -1, 1), y, atol=1e-6)
    assert np.allclose(ns["y2"], y, atol=1e-5)
    assert ns["saved_eval"].batch_stats is False and ns["saved"].batch_stats is True


def _check_fused(ns):
    assert ns["dz"].shape == ns["x"].shape
    assert ns["conv_w"].shape == (16, 3, 3, 3) and ns["conv_b"].shape == (16,)


def _check_torch(ns):
    assert ns["weight"].grad is not None and ns["weight"].grad.shape == (64,)
    assert type(ns["model"][1]).__name__ == "SyncBatchNorm"


def _check_jax(ns):
    assert ns["dx"].shape == ns["x"].shape and ns["new_mean"].shape == (16,)


def _check_tf_style(ns):
    h, seq, mask = ns["h"], ns["seq"], ns["mask"]
    assert np.allclose(ns["batch_mean"], h.mean(0), atol=1e-6) and np.allclose(ns["batch_var"], h.var(0), atol=1e-5)
    assert ns["bn"].shape == h.shape and ns["mean"].shape == (3,)
    assert np.allclose(ns["mean"], seq[mask].mean(0), atol=1e-6)
    assert ns["dx"].shape == seq.shape
    w = np.broadcast_to(ns["w"], h.shape)
    assert np.allclose(ns["weighted_mean"], (w * h).sum(0) / w.sum(0), atol=1e-5)


def _check_flax(ns):
    x = ns["x"]
    assert ns["y"].shape == ns["y_eval"].shape == x.shape and ns["hvp"].shape == x.shape
    assert set(ns["updates"]["batch_stats"]) == {"mean", "var"}


def _check_layer(ns):
    assert ns["dx"].shape == ns["x"].shape
    assert set(ns["state"]) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


#: Extra checks on what a block defines, by the heading it sits under.
CHECKS = {
    "Use": _check_use,
    "Fused and extended batch norm": _check_fused,
    "PyTorch": _check_torch,
    "JAX": _check_jax,
    "A layer for custom trainers": _check_layer,
    "TensorFlow-style: reduction axes, broadcast parameters, weights and masks": _check_tf_style,
    "Flax": _check_flax,
}


def _slug(block):
    return re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-") + f"-L{block.line}"


# ------------------------------------------------------------------ tests ---
@pytest.mark.parametrize("block", PYTHON, ids=[_slug(b) for b in PYTHON])
def test_python_block_runs(block):
    """Each Python block runs on its own, as pasted, and makes what it says."""
    _require(block.code)
    modules = _imports(block.code)
    if any(name.startswith("numba") for name in modules) and "cuda" in block.code:
        code = _SIMULATOR_PRELUDE + block.code + _SIMULATOR_EPILOGUE
        assert "numba-cuda (simulator)" in _run_child(code, block, NUMBA_ENABLE_CUDASIM="1")
    elif "mpi4py" in modules:
        _run_child(block.code, block)
    elif "keras" in modules:  # Keras fixes its backend at import: a child process, on JAX
        _run_child(block.code + _KERAS_EPILOGUE, block, KERAS_BACKEND="jax")
    else:
        namespace = {"__name__": "__readme__"}
        exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        check = CHECKS.get(block.heading)
        if check is not None:
            check(namespace)


def test_every_python_section_is_checked():
    """The checks above name sections that still have a Python block."""
    assert set(CHECKS) <= {b.heading for b in PYTHON}
    assert all(b.lang in ("python", "bash", "") for b in BLOCKS), [(b.line, b.lang) for b in BLOCKS]


def test_every_shell_block_is_run_or_excused():
    """Each shell block is run below or listed, with the reason, as not run; each entry names one block."""
    listed = [_shell_block(prefix) for prefix in (*SHELL_RUN.values(), *SHELL_NOT_RUN)]
    unlisted = [f"README.md:{b.line}: {b.first_line}" for b in SHELL if b not in listed]
    assert not unlisted, "shell blocks neither run nor excused in SHELL_NOT_RUN:\n" + "\n".join(unlisted)


@pytest.mark.parametrize("prefix", SHELL_RUN.values(), ids=SHELL_RUN.keys())
def test_shell_block_runs(prefix, tmp_path):
    """The block runs under bash, with ``python`` this interpreter, in a scratch copy of the README and reports."""
    block = _shell_block(prefix)
    shutil.copy(README, tmp_path / "README.md")
    for fragment in readme.FRAGMENTS.values():
        (tmp_path / fragment.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / fragment.path, tmp_path / fragment.path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = _child_env(PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"README.md:{block.line}:\n{block.code}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "README.md").read_text() == README.read_text()


def test_generated_sections_match_the_committed_reports():
    """Between its markers, the README holds exactly the fragment files' text (``python -m fastbn readme``)."""
    problems = readme.check(str(README))
    assert not problems, "\n".join(problems)


def test_readme_command_splices_and_check_fails_on_a_difference(tmp_path):
    """``readme --check`` exits 1 naming the section that differs; ``readme`` rewrites it; unknown markers fail."""
    fragments = {name: f"{name} text, as measured\n" for name in readme.FRAGMENTS}
    for name, fragment in readme.FRAGMENTS.items():
        (tmp_path / fragment.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / fragment.path).write_text(fragments[name])
    sections = "".join(
        f"## {name}\n\n<!-- generated:{name} -->\nstale\n<!-- /generated:{name} -->\n\nafter\n"
        for name in readme.FRAGMENTS
    )
    (tmp_path / "README.md").write_text("# title\n\n" + sections)

    def command(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastbn", "readme", *args],
            cwd=tmp_path,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = command("--check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert all(f"{name}: README differs from" in proc.stderr for name in readme.FRAGMENTS), proc.stderr
    assert command().returncode == 0
    text = (tmp_path / "README.md").read_text()
    for name in readme.FRAGMENTS:
        assert f"<!-- generated:{name} -->\n\n{name} text, as measured\n\n<!-- /generated:{name} -->\n\nafter" in text
    assert command("--check").returncode == 0
    assert readme.splice(text, fragments) == (text, [], [])

    # A missing fragment or a missing pair of markers is named; an unknown marker is an error.
    name, fragment = next(iter(readme.FRAGMENTS.items()))
    (tmp_path / fragment.path).unlink()
    proc = command("--check")
    assert proc.returncode == 1 and f"{name}: no fragment {fragment.path}" in proc.stderr, proc.stderr
    (tmp_path / "README.md").write_text(text.replace(f"generated:{name} ", "generated:nonesuch "))
    proc = command("--check")
    assert proc.returncode == 2 and "unknown generated section 'nonesuch'" in proc.stderr, proc.stderr
    _, _, missing = readme.splice("no markers\n", fragments)
    assert missing == list(readme.FRAGMENTS)


def test_startup_command_writes_its_fragment(tmp_path, monkeypatch, capsys):
    """``python -m fastbn startup`` prints the table and writes it, by default to the README's fragment file."""
    import argparse

    from fastbn.tools import cli

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    readme.add_parser(commands)
    args = parser.parse_args(["readme", "--check"])
    assert args.check and args.readme == "README.md"
    # The measurement itself (fresh interpreters, a cold compile) is left out: a fixed one stands in.
    times = {"import": 0.065, "forward": 6.9, "backward": 3.1, "again": 0.0003, "layer": "tbb"}
    monkeypatch.setattr(cli, "_first_call", lambda cache_dir: times)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["startup", "--help"])
    assert "bench/results/startup.md" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["startup", "--repeats", "1"]) == 0
    written = (tmp_path / readme.FRAGMENTS["startup"].path).read_text()
    assert written.startswith("First-call cost, float32 (8, 16, 8, 8) NCHW, threading layer tbb")
    assert "| cold (empty kernel cache: compiles) | 65 ms | 6900 ms | 3100 ms | 0.30 ms |" in written
    assert written in capsys.readouterr().out
    assert cli.main(["startup", "--repeats", "1", "--out", ""]) == 0


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test-command" in ci
    text = README.read_text()
    command = text.split("<!-- ci:test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pytest" in command


def test_demo_command_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn", "demo", "--shape", "4", "3", "5", "5", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "per-channel output mean ~ bias: True" in proc.stdout


def test_blocks_parse_as_fenced():
    """The parser finds what a fence holds, with its heading (a guard on the helper the tests rest on)."""
    text = textwrap.dedent("""\
        # top
        ## Part
        ```python
        # not a heading
        a = 1
        ```
        ```bash
        echo hi
        ```
        """)
    python, shell = readme_blocks(text)
    assert python == Block("python", "Part", 3, "# not a heading\na = 1\n")
    assert shell.first_line == "echo hi" and shell.heading == "Part"


def test_suite_report_is_written_only_for_a_passing_run_of_the_whole_suite(tmp_path):
    """``FASTBN_SUITE_REPORT`` (tests/conftest.py): the README's suite size and time come from a real run.

    A stand-in project with this suite's conftest and three tests (one skipped) runs on two xdist
    workers: the whole run writes the counts, the workers and the machine; a ``-k`` selection or a
    failing run writes nothing.
    """
    from fastbn.backends.cpu.machine import machine

    project = tmp_path / "project"
    (project / "t").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["t"]\n')
    shutil.copy(ROOT / "tests" / "conftest.py", project / "t" / "conftest.py")
    tests = project / "t" / "test_stand_in.py"
    tests.write_text(
        "import os, pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert not os.environ.get('FAIL')\n"
        "@pytest.mark.skip(reason='stand-in')\n"
        "def test_c(): pass\n"
    )
    report = tmp_path / "suite.md"

    def run(*args, **env):
        environ = dict(os.environ, FASTBN_SUITE_REPORT=str(report), PYTHONPATH=str(ROOT), **env)
        command = [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", *args]
        return subprocess.run(command, cwd=project, env=environ, capture_output=True, text=True, timeout=300)

    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert text.startswith("3 tests (2 passed, 1 skipped, 0 expected failures) in 0 min "), text
    assert f"on {machine().describe()}, with 2 pytest-xdist workers" in text, text
    assert text.endswith(
        f"Measured by the README's test command with `FASTBN_SUITE_REPORT={report}` set (tests/conftest.py).\n"
    )
    report.unlink()
    for args, env in (((), {"FAIL": "1"}), (("-k", "test_a"), {}), (("t/test_stand_in.py",), {})):
        proc = run(*args, **env)
        assert "FASTBN_SUITE_REPORT: not written" in proc.stdout, proc.stdout
        assert not report.exists()
