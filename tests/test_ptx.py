"""``python -m fastbn ptx``: every GPU kernel compiles with the real NVVM compiler, no GPU needed, and its
innermost loops are counted (instructions per element, fastbn/tools/loops.py); and the kernels index with
64-bit integers."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbn._validate import FLOAT_DTYPES
from fastbn.backends.cuda import plan
from fastbn.tools import cuda12, loops, ptx

ROOT = Path(__file__).resolve().parent.parent
# One compute capability per toolkit: cc 7.0 is CUDA 12's (a process of its own), cc 9.0 CUDA 13's.  cc 8.0
# adds nothing either toolkit does not already do here; docs/ptx_kernels.md is the run with all three.
CCS = ("7.0", "9.0")
LINE = re.compile(
    r"^(?P<kernel>\w+)\s+(?P<dtype>float\d+)\s+cc (?P<cc>\d+\.\d+)\s+(?P<status>ok|unsupported|FAILED)\s+"
    r"CUDA (?P<toolkit>\d+\.\d+)\b(?P<rest>.*)$"
)
RESOURCES = re.compile(r"registers +\d+ +spills \d+/\d+ B")
LOOP = re.compile(r"PTX loop (?P<figure>\d+\.\d) instr/elem \((?P<loops>\d+/\d+(, \d+/\d+)*)\)")
#: Kernels with no loop over data: one thread per channel, straight-line code.
NO_LOOP = {"normalize_coefficients", "update_running"}


def _cuda12_installed():
    """True when the wheel with CUDA 12's compiler is installed (fastbn[ptx-cu12] brings it on Linux)."""
    try:
        importlib.metadata.distribution(cuda12.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Both tests that read this run are in one xdist group, so that one worker runs it once (a module fixture
# runs again on every worker that gets one of its tests: two minutes each), and it is session-scoped, so
# that other modules' tests between them on that worker do not tear it down.
@pytest.fixture(scope="session")
def ptx_run(tmp_path_factory):
    """One run of ``python -m fastbn ptx`` for every cc of CCS, with ``--table``; shared by the tests that read it.

    ``--no-sass``: nvdisasm, where installed, takes about half a second a kernel (a minute more here);
    test_loop_figures_of_a_real_kernel counts one kernel's SASS instead."""
    table = tmp_path_factory.mktemp("ptx") / "table.md"
    command = [sys.executable, "-m", "fastbn", "ptx", "--no-sass", "--table", str(table), "--cc", *CCS]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output}"
    return proc, table


@pytest.mark.xdist_group("ptx")
def test_ptx_command_compiles_every_kernel_for_every_dtype(ptx_run):
    proc, _ = ptx_run
    output = proc.stdout + proc.stderr
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


@pytest.mark.xdist_group("ptx")
def test_ptx_command_counts_the_loops_and_writes_the_table(ptx_run):
    """Every compiled kernel's line ends with its loop figure: a positive instructions-per-element count for
    the kernels that loop over data, ``no loop`` for the per-channel ones; the Markdown table has one row per
    kernel, dtype and cc, under a header naming the command."""
    proc, table = ptx_run
    ok = [m for m in map(LINE.match, proc.stdout.splitlines()) if m and m["status"] == "ok"]
    assert ok, proc.stdout
    for line in ok:
        if line["kernel"] in NO_LOOP:
            assert "PTX loop no loop" in line["rest"], line.group(0)
            continue
        found = LOOP.search(line["rest"])
        assert found and 0 < float(found["figure"]) < 1000, line.group(0)
        assert "SASS " + loops.SASS_SKIPPED in line["rest"], line.group(0)
    text = table.read_text()
    assert f"--cc {' '.join(CCS)} --table" in text and "--no-sass" in text, text[:400]
    rows = [row.split("|")[1:-1] for row in text.splitlines() if row.startswith("| ") and "kernel" not in row]
    assert len(rows) == len(CCS) * sum(len(plan.signatures(dtype)) for dtype in FLOAT_DTYPES), text
    for cells in rows:
        kernel, figure = cells[0].strip(), cells[4].strip()
        if cells[2].strip() == "unsupported":
            continue
        assert figure == "no loop" if kernel in NO_LOOP else float(figure) > 0, cells


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
    return lambda cc, **_: [("normalize", "float32", status, "reason" if status != "ok" else None, 0.0, "CUDA 13.5")]


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
    monkeypatch.setattr(ptx, "compile_cc", lambda cc, **_: next(calls))
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
    """Every named integer variable of every kernel (device functions inlined) is 64-bit (int64, or
    uint64 where an index is known non-negative, which spares Numba's negative-index wraparound), so
    that index arithmetic cannot wrap at 2**31 elements; the only narrower integers are the int32
    special registers (threadIdx.x, ...) as they are read, before the kernels widen them (Numba
    names those temporaries ``...load_attr...``, also inside inlined device functions)."""
    from numba.cuda.compiler import compile_cuda  # numba-cuda's front end: typing and lowering, no NVVM

    for name, dispatcher, argtypes in plan.signatures(np.float16):
        typemap = compile_cuda(dispatcher.py_func, None, argtypes, cc=(8, 0)).fndesc.typemap
        for variable, vartype in typemap.items():
            text = str(vartype)
            if re.fullmatch(r"u?int(8|16|32)", text):
                assert "load_attr" in variable, (name, variable, text)
            elif re.fullmatch(r"u?int\d+", text):
                assert text in ("int64", "uint64"), (name, variable, text)


# ------------------------------------------------------------ the loop parser, on hand-written PTX and SASS ---
def _ptx(body, params=12):
    """A PTX module of one kernel ``k`` with ``params`` u64 parameters and ``body``; the first array's data
    pointer (parameter 4) is %rd3, another array's (parameter 11) %rd4, as NVVM sets them up."""
    names = ",\n".join(f"\t.param .u64 k_param_{i}" for i in range(params))
    prologue = (
        "\tld.param.u64 \t%rd1, [k_param_4];\n\tld.param.u64 \t%rd2, [k_param_11];\n"
        "\tcvta.to.global.u64 \t%rd3, %rd1;\n\tcvta.to.global.u64 \t%rd4, %rd2;\n"
    )
    return f".version 8.8\n.target sm_90\n.address_size 64\n\n.visible .entry k(\n{names}\n)\n{{\n{prologue}{body}}}\n"


def _counts(ptx_text):
    return [(lp.instructions, lp.global_loads, lp.elements) for lp in loops.ptx_loops(ptx_text)]


def test_loop_with_a_backward_branch():
    """A backward ``bra`` closes a loop; its body's instructions count, its label, directive and comments do
    not; the load from the first array is an element, the load from another array is not."""
    text = _ptx(
        "\tmov.u64 \t%rd5, 0;\n"
        "$L__BB0_1:\n"
        '\t.pragma "nounroll";\n'
        "\tshl.b64 \t%rd6, %rd5, 2;\n"
        "\tadd.s64 \t%rd7, %rd3, %rd6; // &x[i]\n"
        "\tld.global.f32 \t%f1, [%rd7];\n"
        "\tadd.s64 \t%rd8, %rd4, %rd6;\n"
        "\tld.global.f32 \t%f2, [%rd8];\n"
        "\tadd.f32 \t%f3, %f1, %f2;\n"
        "\tadd.s64 \t%rd5, %rd5, 1;\n"
        "\tsetp.lt.s64 \t%p1, %rd5, %rd9;\n"
        "\t@%p1 bra \t$L__BB0_1;\n"
        "\tret;\n"
    )
    assert _counts(text) == [(9, 2, 1)]
    summary = loops.summarize(text, sass=False)
    assert loops.per_element(summary["ptx"]) == 9.0
    assert loops.describe(summary["ptx"]) == "9.0 instr/elem (9/1)"
    assert loops.describe(summary["sass"]) == loops.SASS_SKIPPED


def test_nested_loops_report_the_inner_one_and_unrolled_bodies_their_elements():
    """Of a loop nest only the inner loop is innermost; a pointer carried around the loop (several
    definitions of one register, an offset address) still traces back to the first array; of two data loops
    (NVVM's remainder loop and its body unrolled by 2) the one with more elements per iteration is the hot one."""
    text = _ptx(
        "\tadd.s64 \t%rd10, %rd3, 16;\n"
        "$L__BB0_1:\n"  # outer loop
        "\tmov.u64 \t%rd5, 0;\n"
        "$L__BB0_2:\n"  # inner loop, unrolled by 2: two loads of x through a carried pointer
        "\tld.global.f32 \t%f1, [%rd10];\n"
        "\tld.global.f32 \t%f2, [%rd10+4];\n"
        "\tadd.s64 \t%rd10, %rd10, 8;\n"
        "\tadd.s64 \t%rd5, %rd5, 2;\n"
        "\tsetp.lt.s64 \t%p1, %rd5, %rd9;\n"
        "\t@%p1 bra \t$L__BB0_2;\n"
        "\tadd.s64 \t%rd11, %rd11, 1;\n"
        "\tsetp.lt.s64 \t%p2, %rd11, %rd12;\n"
        "\t@%p2 bra \t$L__BB0_1;\n"
        "$L__BB0_3:\n"  # remainder loop: one element
        "\tld.global.f32 \t%f3, [%rd10];\n"
        "\tadd.s64 \t%rd10, %rd10, 4;\n"
        "\tsetp.lt.s64 \t%p3, %rd10, %rd13;\n"
        "\t@%p3 bra \t$L__BB0_3;\n"
        "\tret;\n"
    )
    assert _counts(text) == [(6, 2, 2), (4, 1, 1)]
    assert loops.describe(loops.summarize(text, sass=False)["ptx"]) == "3.0 instr/elem (6/2, 4/1)"


def test_vector_loads_count_their_width():
    text = _ptx(
        "$L__BB0_1:\n"
        "\tld.global.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd3];\n"
        "\tld.global.v2.f64 \t{%fd1, %fd2}, [%rd3+16];\n"
        "\tadd.s64 \t%rd3, %rd3, 32;\n"
        "\tsetp.lt.u64 \t%p1, %rd3, %rd9;\n"
        "\t@%p1 bra \t$L__BB0_1;\n"
        "\tret;\n"
    )
    assert _counts(text) == [(5, 2, 6)]


def test_no_loop_and_no_data_loop():
    """Forward branches make no loop; a loop that loads only other arrays (a block reduction, a per-channel
    kernel's work) is no data loop, and has no per-element figure."""
    straight = _ptx(
        "\tsetp.eq.s64 \t%p1, %rd9, 0;\n\t@%p1 bra \t$L__BB0_2;\n\tld.global.f32 \t%f1, [%rd3];\n$L__BB0_2:\n\tret;\n"
    )
    assert _counts(straight) == []
    assert loops.describe(loops.summarize(straight, sass=False)["ptx"]) == "no loop"
    other = _ptx(
        "$L__BB0_1:\n"
        "\tld.global.f32 \t%f1, [%rd4];\n"
        "\tadd.s64 \t%rd4, %rd4, 4;\n"
        "\tsetp.lt.u64 \t%p1, %rd4, %rd9;\n"
        "\t@%p1 bra \t$L__BB0_1;\n"
        "\tret;\n"
    )
    assert _counts(other) == [(4, 1, 0)]
    part = loops.summarize(other, sass=False)["ptx"]
    assert loops.per_element(part) is None and loops.describe(part) == "no data loop (1 other)"


SASS = """
	.section	.text.k,"ax",@progbits
k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 EXIT ;
.L_x_0:
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/                   LDG.E R3, desc[UR4][R4.64+0x4] ;
        /*0040*/                   FADD R5, R2, R3 ;
        /*0050*/              @!P1 BRA P2, `(.L_x_1) ;
        /*0060*/                   CALL.ABS.NOINC `(__cuda_sm20_div_u64) ;
.L_x_1:
        /*0070*/               @P1 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_sass_loops_take_their_elements_from_the_ptx_loop():
    """A SASS loop (branches inside included, ptxas's unreachable trap loop not) takes its elements from the
    PTX loop with as many global loads, or a whole multiple of them."""
    (loop,) = loops.sass_loops(SASS, "k")
    assert (loop.instructions, loop.global_loads, loop.elements) == (6, 2, None)
    same = loops.match_elements([loop], [loops.LoopCount("p", 20, 2, 2)])
    assert same[0].elements == 2 and same[0].per_element == 3.0
    unrolled = loops.match_elements([loop], [loops.LoopCount("p", 10, 1, 1)])
    assert unrolled[0].elements == 2  # ptxas unrolled a 1-load loop by 2
    assert loops.match_elements([loop], [loops.LoopCount("p", 10, 3, 3)])[0].elements is None


def test_format_line_keeps_the_resources_and_adds_the_loops():
    detail = {"registers": 40, "spill_stores": 0, "spill_loads": 0, "shared": 0}
    detail["loops"] = {"ptx": {"loops": [[207, 16, 4], [55, 4, 1]]}, "sass": {"error": loops.NO_DISASSEMBLER}}
    line = ptx.format_line((9, 0), "normalize", "float32", "ok", detail, 0.5, "CUDA 13.5")
    found = LINE.match(line)
    assert found and RESOURCES.search(found["rest"]), line
    assert LOOP.search(line)["figure"] == "51.8" and "(207/4, 55/1)" in line, line
    assert f"SASS {loops.NO_DISASSEMBLER}" in line and "install nvidia-cuda-nvdisasm" in line, line


def test_loop_figures_of_a_real_kernel():
    """One real kernel compiled for cc 9.0: normalize's inner loop has a positive, finite count of instructions
    per element in its PTX, and, where nvdisasm is installed, in its SASS."""
    from fastbn.backends.cuda import target

    if target.SIMULATOR:
        pytest.skip("the simulator compiles no PTX")
    name, dispatcher, argtypes = next(row for row in plan.signatures(np.float32) if row[0] == "normalize")
    text = target.compile_ptx(dispatcher.py_func, argtypes, (9, 0))
    _report, cubin = ptx.assemble(text, (9, 0))
    summary = loops.summarize(text, cubin, sass=bool(loops.disassemblers()))
    figure = loops.per_element(summary["ptx"])
    assert figure is not None and math.isfinite(figure) and figure > 0, (name, summary)
    if loops.disassemblers() and cubin is not None:
        sass_figure = loops.per_element(summary["sass"])
        assert sass_figure is not None and math.isfinite(sass_figure) and sass_figure > 0, summary
    else:
        assert "error" in summary["sass"], summary
