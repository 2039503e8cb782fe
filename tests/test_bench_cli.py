"""Smoke test of ``python -m fastbn bench``: a tiny matrix writes its report, and bad specs fail clearly.

Speed is never asserted here; the benchmark itself lives in bench/ and in fastbn/tools/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastbn", "bench", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )


def test_tiny_matrix_writes_table_snippet_json_and_chart(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--shapes", "4x8x6x6,6x5x5x8@-1", "--ops", "forward_train,moments", "--repeats", "2",
                     "--rounds", "1", "--no-sweeps", "--no-compile-time", "--no-progress", "--out", str(out),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    snippet = (out / "README_snippet.md").read_text()
    for text in (report, snippet):
        assert "| operation | shape | dtype | MB | fastbn ms | GB/s | % roofline |" in text
        assert "(4x8x6x6), axis 1" in text and "(6x5x5x8), axis -1" in text
        assert "python -m fastbn bench" in text  # names the command that made it
    assert "## Performance" in snippet
    assert "threads" in report  # machine and thread counts are stated
    results = json.loads((out / "results.json").read_text())
    rows = {(r["operation"], r["shape"], r["dtype"]) for r in results["results"]}
    # float32 for both operations, float16 for training forward only
    assert rows == {(op, shape, "float32") for op in ("forward_train", "moments")
                    for shape in ("4x8x6x6", "6x5x5x8@-1")} | {("forward_train", "4x8x6x6", "float16"),
                                                               ("forward_train", "6x5x5x8@-1", "float16")}
    assert all(r["error_ok"] for r in results["results"])
    pytest.importorskip("matplotlib")
    png = out / "bench.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ops", "forward_trian"], "unknown operation 'forward_trian'"),
        (["--shapes", "64xAx56"], "'64xAx56' is not a shape"),
        (["--shapes", "8x4@2"], "channel axis 2 is out of range"),
        (["--dtypes", "float8"], "unknown dtype 'float8'"),
    ],
)
def test_bad_operation_or_shape_is_a_clear_error(tmp_path, args, message):
    proc = run_bench(*args, "--out", str(tmp_path / "never"), cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "never").exists()


def test_bench_fused_writes_its_table_and_checks_both_forms_agree(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn", "bench-fused", "--shapes", "32x4x5x5,32x5x5x4@-1", "--repeats", "1",
         "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "fused.md").read_text()
    assert "python -m fastbn bench-fused --shapes 32x4x5x5,32x5x5x4@-1" in report
    rows = json.loads((out / "fused.json").read_text())["rows"]
    # every variant on both shapes (ghost batches of 16 divide 32), and both forms give the same results
    assert {(r["direction"], r["variant"], r["shape"]) for r in rows} == {
        (d, v, s) for s in ("32x4x5x5", "32x5x5x4@-1")
        for d, v in [("forward", "relu"), ("forward", "add_relu"), ("forward", "ghost"), ("forward", "renorm"),
                     ("backward", "relu"), ("backward", "add_relu")]}
    assert all(r["agree"] for r in rows)
    bad = subprocess.run([sys.executable, "-m", "fastbn", "bench-fused", "--shapes", "8x"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert bad.returncode != 0 and "'8x' is not a shape" in bad.stderr


def test_help_names_every_command_and_the_library_imports_no_tool(tmp_path):
    """``python -m fastbn --help`` lists every command; ``import fastbn`` and a forward leave fastbn.tools
    unimported (the tools depend on the library, never the other way)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastbn", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    listed = re.search(r"\{([a-z,-]+)\}", proc.stdout)
    assert listed, proc.stdout
    assert {"demo", "startup", "ptx", "bench", "bench-fused", "plan", "torch-suite"} <= set(listed.group(1).split(",")), \
        proc.stdout
    script = ("import sys, numpy as np, fastbn; fastbn.forward(np.ones((4, 3), np.float32)); "
              "print([m for m in sys.modules if m.startswith('fastbn.tools')])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
