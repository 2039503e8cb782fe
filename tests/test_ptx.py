"""``python -m fastbn ptx``: every GPU kernel compiles with the real NVVM compiler, no GPU needed;
and the kernels index with 64-bit integers."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbn._validate import FLOAT_DTYPES
from fastbn.backends.cuda import plan
from fastbn.tools import cuda12, ptx

ROOT = Path(__file__).resolve().parent.parent
CCS = ("7.0", "8.0", "9.0")
LINE = re.compile(
    r"^(?P<kernel>\w+)\s+(?P<dtype>float\d+)\s+cc (?P<cc>\d+\.\d+)\s+(?P<status>ok|unsupported|FAILED)\s+"
    r"CUDA (?P<toolkit>\d+\.\d+)\b(?P<rest>.*)$"
)
RESOURCES = re.compile(r"registers +\d+ +spills \d+/\d+ B")


def _cuda12_installed():
    """True when the wheel with CUDA 12's compiler is installed (fastbn[ptx-cu12] brings it on Linux)."""
    try:
        importlib.metadata.distribution(cuda12.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_ptx_command_compiles_every_kernel_for_every_dtype():
    command = [sys.executable, "-m", "fastbn", "ptx", "--cc", *CCS]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output}"
    lines = [m.groupdict() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    seen = [(line["kernel"], line["dtype"], line["cc"]) for line in lines]
    expected = [
        (kernel, dtype.name, cc) for cc in CCS for dtype in FLOAT_DTYPES for kernel, _, _ in plan.signatures(dtype)
    ]
    assert sorted(seen) == sorted(expected), output  # exactly one line per kernel, dtype and cc
    from fastbn.backends.cuda import target

    supported = target.supported_ccs()
    primary = target.toolkit_version()
    for line in lines:
        cc = tuple(int(part) for part in line["cc"].split("."))
        if supported is None or cc in supported:
            # CUDA 13 in this process; ptxas (in nvJitLink) reports what it assembled
            assert line["status"] == "ok" and line["toolkit"] == primary, line
            assert RESOURCES.search(line["rest"]), line
        elif _cuda12_installed():
            # cc 7.0 (Volta): CUDA 12's NVVM in a process of its own, then CUDA 12's ptxas
            assert line["status"] == "ok" and line["toolkit"].startswith("12."), line
            assert RESOURCES.search(line["rest"]), line
        else:
            assert line["status"] == "unsupported" and "not a target of this toolkit" in line["rest"], line
            assert cuda12.DISTRIBUTION in line["rest"], line  # says what to install
    assert re.search(r"\d+ compiled, \d+ unsupported by the installed toolkits, 0 failed", proc.stdout), proc.stdout


def test_without_cuda12_a_dropped_cc_is_unsupported(monkeypatch):
    """With no CUDA 12 compiler, a cc that CUDA 13 dropped is reported, not compiled, and names the wheel."""
    from fastbn.backends.cuda import target

    supported = target.supported_ccs()
    if supported is None or (7, 0) in supported:
        pytest.skip(f"this toolkit (CUDA {target.toolkit_version()}) targets cc 7.0 itself")
    monkeypatch.setattr(cuda12, "locate", lambda: (None, f"install {cuda12.DISTRIBUTION} (test)"))
    results = ptx.compile_cc((7, 0))
    assert len(results) == sum(len(plan.signatures(dtype)) for dtype in FLOAT_DTYPES)
    for kernel, dtype, status, detail, seconds, _toolkit in results:
        assert status == "unsupported" and seconds == 0.0, (kernel, dtype, status, detail)
        assert "not a target of this toolkit" in detail and f"install {cuda12.DISTRIBUTION}" in detail, detail


def test_cuda12_child_needs_the_forced_cc():
    """The CUDA 12 child refuses to start unless its environment forces the compute capability it compiles for."""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_FORCE_CUDA_CC"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn.tools.cuda12", "7.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "NUMBA_FORCE_CUDA_CC must be 7.0" in proc.stderr, proc.stderr


def test_libdevice_belongs_to_the_loaded_nvvm():
    """numba-cuda links the libdevice of the NVVM it loaded, even with CUDA 12's wheel installed beside
    CUDA 13's (numba-cuda alone would take CUDA 12's libdevice for CUDA 13's NVVM)."""
    from fastbn.backends.cuda import target

    if target.SIMULATOR:
        pytest.skip("the simulator loads no NVVM")
    paths = target.compiler_paths()
    assert paths["libdevice"] == target.libdevice_beside(paths["nvvm"]), paths
    toolkit, _ = cuda12.locate()
    if toolkit is not None:
        assert not os.path.samefile(paths["nvvm"], toolkit.nvvm), paths  # CUDA 13's NVVM in normal use
        assert not os.path.samefile(paths["libdevice"], toolkit.libdevice), paths


def _fake_results(status):
    return lambda cc: [("normalize", "float32", status, "reason" if status != "ok" else None, 0.0, "CUDA 13.5")]


def test_exit_status(monkeypatch, capsys):
    """Non-zero on any failure, when nothing compiled, or (with --strict) on an unsupported cc."""
    monkeypatch.setattr(ptx, "compile_cc", _fake_results("ok"))
    assert ptx.main(["8.0"], jobs=1) == 0
    monkeypatch.setattr(ptx, "compile_cc", _fake_results("FAILED"))
    assert ptx.main(["8.0"], jobs=1) == 1
    monkeypatch.setattr(ptx, "compile_cc", _fake_results("unsupported"))
    assert ptx.main(["7.0"], jobs=1) == 1  # nothing compiled at all
    assert ptx.main(["7.0", "8.0"], jobs=1) == 1
    calls = iter([_fake_results("unsupported")(None), _fake_results("ok")(None)] * 2)
    monkeypatch.setattr(ptx, "compile_cc", lambda cc: next(calls))
    assert ptx.main(["7.0", "8.0"], jobs=1) == 0
    assert ptx.main(["7.0", "8.0"], jobs=1, strict=True) == 1
    assert ptx.main(["eight"], jobs=1) == 2
    capsys.readouterr()


def test_without_numba_cuda_the_command_says_what_to_install(monkeypatch):
    """Without numba-cuda, ``from numba import cuda`` still finds Numba's own deprecated CUDA target, on
    which the kernels fail mid-compilation; the command asks for numba-cuda first and names the extra."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "numba_cuda" else find_spec(name, *args)
    )
    out = io.StringIO()
    assert ptx.main(["8.0"], jobs=1, out=out) == 2
    assert "numba-cuda is not installed" in out.getvalue() and "pip install 'fastbn[cuda]'" in out.getvalue()


def test_kernels_index_with_64_bit_integers():
    """Every named integer variable of every kernel (device functions inlined) is int64, so that
    index arithmetic cannot wrap at 2**31 elements; the only narrower integers are the int32
    special registers (threadIdx.x, ...) as they are read, before the kernels widen them."""
    from numba.cuda.compiler import compile_cuda  # numba-cuda's front end: typing and lowering, no NVVM

    for name, dispatcher, argtypes in plan.signatures(np.float16):
        typemap = compile_cuda(dispatcher.py_func, None, argtypes, cc=(8, 0)).fndesc.typemap
        for variable, vartype in typemap.items():
            text = str(vartype)
            if re.fullmatch(r"u?int(8|16|32)|uint64", text):
                assert variable.startswith("$") and "load_attr" in variable, (name, variable, text)
            elif re.fullmatch(r"u?int\d+", text):
                assert text == "int64", (name, variable, text)
