"""``python -m fastbn ptx``: every GPU kernel compiles with the real NVVM compiler, no GPU needed;
and the kernels index with 64-bit integers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastbn import _cuda, _ptx
from fastbn._validate import FLOAT_DTYPES

ROOT = Path(__file__).resolve().parent.parent
CCS = ("7.0", "8.0", "9.0")
LINE = re.compile(r"^(?P<kernel>\w+)\s+(?P<dtype>float\d+)\s+cc (?P<cc>\d+\.\d+)\s+(?P<status>ok|unsupported|FAILED)\b"
                  r"(?P<rest>.*)$")


def test_ptx_command_compiles_every_kernel_for_every_dtype():
    command = [sys.executable, "-m", "fastbn", "ptx", "--cc", *CCS]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output}"
    lines = [m.groupdict() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    seen = [(line["kernel"], line["dtype"], line["cc"]) for line in lines]
    expected = [(kernel, dtype.name, cc) for cc in CCS for dtype in FLOAT_DTYPES
                for kernel, _, _ in _cuda.signatures(dtype)]
    assert sorted(seen) == sorted(expected), output  # exactly one line per kernel, dtype and cc
    from fastbn import _cuda_target

    supported = _cuda_target.supported_ccs()
    for line in lines:
        cc = tuple(int(part) for part in line["cc"].split("."))
        if supported is None or cc in supported:
            # ptxas (in nvJitLink) reports the resources of what it assembled
            assert line["status"] == "ok", line
            assert re.search(r"registers +\d+ +spills \d+/\d+ B", line["rest"]), line
        else:
            assert line["status"] == "unsupported" and "not a target of this toolkit" in line["rest"], line
    assert re.search(r"\d+ compiled, \d+ unsupported by this toolkit, 0 failed", proc.stdout), proc.stdout


def _fake_results(status):
    return lambda cc: [("normalize", "float32", status, "reason" if status != "ok" else None, 0.0)]


def test_exit_status(monkeypatch, capsys):
    """Non-zero on any failure, when nothing compiled, or (with --strict) on an unsupported cc."""
    monkeypatch.setattr(_ptx, "compile_cc", _fake_results("ok"))
    assert _ptx.main(["8.0"], jobs=1) == 0
    monkeypatch.setattr(_ptx, "compile_cc", _fake_results("FAILED"))
    assert _ptx.main(["8.0"], jobs=1) == 1
    monkeypatch.setattr(_ptx, "compile_cc", _fake_results("unsupported"))
    assert _ptx.main(["7.0"], jobs=1) == 1  # nothing compiled at all
    assert _ptx.main(["7.0", "8.0"], jobs=1) == 1
    calls = iter([_fake_results("unsupported")(None), _fake_results("ok")(None)] * 2)
    monkeypatch.setattr(_ptx, "compile_cc", lambda cc: next(calls))
    assert _ptx.main(["7.0", "8.0"], jobs=1) == 0
    assert _ptx.main(["7.0", "8.0"], jobs=1, strict=True) == 1
    assert _ptx.main(["eight"], jobs=1) == 2
    capsys.readouterr()


def test_kernels_index_with_64_bit_integers():
    """Every named integer variable of every kernel (device functions inlined) is int64, so that
    index arithmetic cannot wrap at 2**31 elements; the only narrower integers are the int32
    special registers (threadIdx.x, ...) as they are read, before the kernels widen them."""
    from numba.cuda.compiler import compile_cuda  # numba-cuda's front end: typing and lowering, no NVVM

    for name, dispatcher, argtypes in _cuda.signatures(np.float16):
        typemap = compile_cuda(dispatcher.py_func, None, argtypes, cc=(8, 0)).fndesc.typemap
        for variable, vartype in typemap.items():
            text = str(vartype)
            if re.fullmatch(r"u?int(8|16|32)|uint64", text):
                assert variable.startswith("$") and "load_attr" in variable, (name, variable, text)
            elif re.fullmatch(r"u?int\d+", text):
                assert text == "int64", (name, variable, text)
