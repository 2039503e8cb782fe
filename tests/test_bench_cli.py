"""Smoke test of ``python -m fastbn bench``: a tiny matrix writes its report, and bad specs fail clearly.

Speed is never asserted here; the benchmark itself lives in bench/ and in fastbn/tools/.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastbn", "bench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )


def test_tiny_matrix_writes_table_snippet_json_and_chart(tmp_path):
    out = tmp_path / "results"
    proc = run_bench(
        "--shapes",
        "4x8x6x6,6x5x5x8@-1",
        "--ops",
        "forward_train,moments",
        "--repeats",
        "2",
        "--rounds",
        "1",
        "--no-sweeps",
        "--no-compile-time",
        "--no-progress",
        "--peers",
        "numpy,torch",
        "--copy-mib",
        "64",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    # the roofline: the machine named with its vector extensions, the three copies and the read measured
    assert "## The roofline" in report and "vector extensions" in report
    for kernel in ("np.copyto, 1 thread", "prange copy, ordinary stores", "prange copy, non-temporal stores"):
        assert f"| {kernel} |" in report, kernel
    # every peer is listed: the ones left out say so rather than vanishing
    assert "## Peers side by side" in report
    for name in ("JAX", "Flax", "TensorFlow"):
        assert f"- {name}: left out" in report, name
    snippet = (out / "README_snippet.md").read_text()
    for text in (report, snippet):
        assert "| operation | shape | dtype | fastbn ms | GB/s (% of roofline) |" in text
        assert "4x8x6x6 NCHW" in text and "6x5x5x8 NHWC" in text
        # only the command line, which names what to type, spells a shape with "@-1"
        assert "@-1" not in re.sub(r"`python -m fastbn bench[^`]*`", "", text) and "0 of 0" not in text
        assert "python -m fastbn bench" in text  # names the command that made it
    assert "## Performance" in snippet and "## Diagnostics" in report
    assert "threads" in report  # machine and thread counts are stated
    results = json.loads((out / "results.json").read_text())
    rows = {(r["operation"], r["shape"], r["dtype"]) for r in results["results"]}
    # float32 for both operations, float16 for training forward only
    assert rows == {
        (op, shape, "float32") for op in ("forward_train", "moments") for shape in ("4x8x6x6", "6x5x5x8@-1")
    } | {("forward_train", "4x8x6x6", "float16"), ("forward_train", "6x5x5x8@-1", "float16")}
    assert all(r["error_ok"] for r in results["results"])
    roof = results["machine"]["roofline"]
    assert roof["bytes"] == 64 << 20
    assert roof["best_gb_s"] == max(roof["gb_s"][k] for k in roof["gb_s"] if k != "prange read") > 0
    for row in results["results"]:
        # tiny tensors are in cache: no roofline bar, and their roofline is at least the beyond-cache one
        assert row["in_cache"] and "roofline" not in row["checks"]
        assert row["roofline_gb_s"] >= roof["best_gb_s"] * (1 - 1e-9)
        assert row["fastest_peer"] in ("numpy", "torch")
    pytest.importorskip("matplotlib")
    png = out / "bench.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------- the report's shape, from fixed numbers (nothing timed) ---
def _row(operation, dims, axis, dtype, fastbn_ms, torch_ms=None, numpy_ms=None, **peers):
    """A result row as bench.run_matrix makes one, with made-up times."""
    from fastbn.tools import bench, cases

    shape = cases.Shape(tuple(dims), axis)
    case = cases.Case(operation, shape, dtype)
    roofline = 2.0 * case.nbytes / 60e9 * 1e3
    row = {
        "operation": operation,
        "shape": shape.label,
        "dims": list(dims),
        "axis": axis,
        "dtype": dtype,
        "bytes": case.nbytes,
        "layout": "channels-last" if shape.channels_last else "channel slab",
        "passes": 2,
        "copy_ms": roofline,
        "copy_fresh_ms": 1.3 * roofline,
        "page_in_ms": 0.3 * roofline,
        "roofline_ms": roofline,
        "roofline_alloc_ms": 1.3 * roofline,
        "error": 1e-7,
        "error_ok": True,
        "samples": 6,
        "fastbn_ms": fastbn_ms,
    }
    if operation != "moments":
        row["reused_ms"] = 0.9 * fastbn_ms
    if numpy_ms is not None:
        row["numpy_ms"] = numpy_ms
    if torch_ms is not None:
        row["torch_ms"] = torch_ms
    for name, value in peers.items():
        row[name] = value
    return bench.evaluate_bar(row)


INFO = {
    "date": "2026-01-01T00:00:00",
    "python": "3.11.7",
    "platform": "Linux",
    "cpu": "Test CPU",
    "cpus": 2,
    "machine": "Test CPU, 2 cores; L1d 32 KiB, L2 1024 KiB per core, L3 32 MiB shared by 2 CPUs",
    "numpy": "2.0",
    "numba": "0.60",
    "fastbn": "0.1.0",
    "fastbn_threads": 2,
    "threading_layer": "tbb",
    "core_cache_bytes": 17825792,
    "memory_gb": 25.3,
}


def _tables(text):
    """Each Markdown table in ``text``, as its header's cells."""
    lines = text.splitlines()
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line, below in itertools.pairwise(lines)
        if line.startswith("| ") and below.startswith("|---")
    ]


@pytest.mark.parametrize("with_torch", [True, False], ids=["with-torch", "numpy-only"])
def test_report_main_table_is_at_most_8_columns_with_diagnostics_below(tmp_path, with_torch):
    from fastbn.tools import report

    big = (64, 56, 56, 64)  # 51 MB float32: the roofline bar applies
    results = [
        _row("forward_train", big, -1, "float32", 6.0, torch_ms=18.0 if with_torch else None, numpy_ms=60.0),
        _row("moments", big, -1, "float32", 4.0, torch_ms=40.0 if with_torch else None, numpy_ms=20.0),
        _row(
            "forward_train",
            (8, 4, 6, 6),
            1,
            "float16",
            0.5,
            torch_ms=0.6 if with_torch else None,
            numpy_ms=5.0,
            in_cache=True,
        ),
    ]
    libraries = ["fastbn", "numpy", "torch"] if with_torch else ["fastbn", "numpy"]
    info = dict(INFO, torch="2.5", torch_threads=2) if with_torch else INFO
    report.write_report(str(tmp_path), info, results, libraries, None, None, None, "python -m fastbn bench", [])
    text = (tmp_path / "report.md").read_text()
    snippet = (tmp_path / "README_snippet.md").read_text()
    tables = _tables(text)
    main, diagnostics = tables[0], next(t for t in tables if "bar checks" in t)
    assert len(main) <= 8 and main[:4] == ["operation", "shape", "dtype", "fastbn ms"], main
    assert "vs fastest peer" in main and "release bar" in main
    # the diagnostic columns moved to the second table, under their own heading
    assert text.index("## Results") < text.index("## Diagnostics")
    for column in ("MB", "% of roofline + page-in", "reused output ms (% of roofline)", "bar checks"):
        assert column in diagnostics and column not in main, column
    # the main table says met or missed in words; pass/miss per check is the diagnostics'
    results_section = text[text.index("## Results") : text.index("## ", text.index("## Results") + 3)]
    assert " pass" not in results_section and "**miss**" not in results_section
    # 18 ms PyTorch against 6 ms: 3.0x, the float32 bar; the roofline (2 passes at 60 GB/s) is 29% of 6 ms
    assert "| **missed**: 29% of roofline, needs 80% |" in results_section
    assert "| NumPy 20.0 | **5.0x** |" in results_section  # moments: NumPy (20 ms) beats PyTorch (40 ms)
    if with_torch:
        assert "| **missed**: 1.20x PyTorch, needs 2.0x |" in results_section  # the float16 row needs 2x
    else:
        assert "| **missed**: 10.0x NumPy" not in results_section
    # shapes as people write them, the machine named, no empty counts
    for page in (text, snippet):
        assert "64x56x56x64 NHWC" in page and "8x4x6x6 NCHW" in page
        assert "@-1" not in page and "0 of 0" not in page
        assert "Test CPU, 2 cores" in page
    snippet_main = _tables(snippet)[0]
    assert len(snippet_main) <= 8 and "release bar" not in snippet_main
    # every implementation side by side, the fastest in bold
    assert "| **6.00** | 60.0 | 18.0 |" in text if with_torch else "| **6.00** | 60.0 |" in text


def test_summary_never_says_0_of_0_without_bars():
    """Small tensors and no PyTorch: no part of the bar applies, and the summary says so in words."""
    from fastbn.tools import report

    results = [_row("forward_train", (8, 4, 6, 6), 1, "float32", 0.5, in_cache=True)]
    summary = report.bar_summary(results)
    assert "0 of 0" not in summary
    assert "no rows with a roofline bar" in summary and "not measured (no peer" in summary
    assert report.results_table(results, ["fastbn"]).splitlines()[2].endswith("| n/a |")


def test_headline_is_the_fastest_peer_and_a_figure_over_the_roofline_is_named_not_clipped():
    from fastbn.tools import report

    big = (64, 56, 56, 64)
    # JAX is the fastest peer here; TensorFlow ran faster than the roofline (1.71 ms): the roofline is then wrong
    row = _row("forward_eval", big, -1, "float32", 3.0, torch_ms=9.0, numpy_ms=30.0, jax_ms=4.5, tensorflow_ms=1.5)
    assert row["fastest_peer"] == "tensorflow" and row["vs_fastest_peer"] == 0.5
    assert set(row["over_roofline"]) == {"tensorflow"} and row["over_roofline"]["tensorflow"] > 100
    fair = _row("forward_eval", big, -1, "float32", 3.0, torch_ms=9.0, numpy_ms=30.0, jax_ms=4.5)
    assert fair["fastest_peer"] == "jax" and fair["vs_fastest_peer"] == 1.5 and fair["over_roofline"] == {}
    summary = report.bar_summary([row, fair])
    assert "**Above 100% of the roofline**" in summary and "TensorFlow at 114%" in summary
    assert "1.50x JAX, needs 3.0x" in summary
    assert "No figure above 100%" in report.bar_summary([fair])
    # a peer not installed is listed as absent
    lines = report.peer_status_lines({"peers": {"tensorflow": "absent: not installed", "jax": "0.10"}})
    assert "- TensorFlow: absent: not installed" in lines and "- JAX: 0.10" in lines and len(lines) == 5


def test_default_shapes_and_the_size_sweep_reach_beyond_the_last_level_cache():
    import math

    from fastbn.tools import bench, cases

    for l3 in (8 << 20, 32 << 20, 105 << 20):
        shapes = cases.default_shapes(l3, memory=24 << 30)
        for channels_last in (False, True):
            sizes = [math.prod(s.dims) * 4 for s in shapes if s.channels_last == channels_last]
            assert max(sizes) >= 4 * l3 and max(sizes) <= (24 << 30) // 48 + 64 * 56 * 56 * 4 * 8, (l3, sizes)
        rows = bench.sweep_sizes(l3)
        assert rows[0] * bench.SWEEP_CHANNELS * 4 == 2048  # 2 KB
        assert rows[-1] * bench.SWEEP_CHANNELS * 4 >= 4 * l3 > rows[-2] * bench.SWEEP_CHANNELS * 4
        assert all(b == 4 * a for a, b in itertools.pairwise(rows))
    # memory bounds the largest shape
    small = cases.beyond_cache_shapes(32 << 20, memory=1 << 30)
    assert all(math.prod(s.dims) * 4 <= (1 << 30) // 48 + 64 * 56 * 56 * 4 * 8 for s in small)


def test_bench_rerenders_report_and_charts_from_json(tmp_path):
    """``--from-json`` times nothing: it redraws report.md, the snippet and the charts from results.json."""
    from fastbn.tools import report

    results = [
        _row("forward_eval", (64, 56, 56, 64), -1, "float32", 5.0, torch_ms=15.0, numpy_ms=40.0),
        _row("moments", (8, 4, 6, 6), 1, "float32", 0.2, torch_ms=0.5, numpy_ms=1.0),
    ]
    saved = {
        "command": "python -m fastbn bench --rounds 5",
        "machine": dict(INFO, torch="2.5", torch_threads=2),
        "results": results,
        "sizes": None,
        "threads": None,
        "compile": None,
    }
    source = tmp_path / "results.json"
    source.write_text(json.dumps(saved))
    out = tmp_path / "again"
    proc = run_bench("--from-json", str(source), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "Generated by `python -m fastbn bench --rounds 5` on 2026-01-01T00:00:00" in text
    assert "64x56x56x64 NHWC" in text and not (out / "results.json").exists()
    assert report.libraries_of(results) == ["fastbn", "numpy", "torch"]
    bad = run_bench("--from-json", str(tmp_path / "missing.json"), "--out", str(out), cwd=tmp_path)
    assert bad.returncode == 2 and "cannot read a results.json" in bad.stderr
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_report_is_readable_and_rerenders(tmp_path):
    from fastbn.tools import bench_fused

    def row(direction, variant, shape, gain, needed, bar):
        return {
            "direction": direction,
            "variant": variant,
            "shape": shape,
            "mb": 51.4,
            "fused_ms": 6.0,
            "separate_ms": 6.0 + gain,
            "speedup": (6.0 + gain) / 6.0,
            "fused_passes": 2,
            "separate_passes": 4,
            "pass_ms": needed / 2,
            "gain_ms": gain,
            "needed_ms": needed,
            "agree": True,
            "bar": bar,
        }

    rows = [
        row("forward", "relu", "64x56x56x64@-1", 7.0, 3.5, True),
        row("forward", "add_relu", "64x56x56x64@-1", 7.0, 7.1, False),
        row("forward", "ghost", "64x64x56x56", 6.0, 3.5, None),
    ]
    path = bench_fused.write_report(str(tmp_path), INFO, rows, "python -m fastbn bench-fused", 45.0)
    text = Path(path).read_text()
    main, diagnostics = _tables(text)[:2]
    assert len(main) <= 8 and len(diagnostics) <= 8
    assert "forward: BN + add + ReLU" in text and "64x56x56x64 NHWC" in text and "@-1" not in text
    assert "1 of 2 rows meet it" in text and "Test CPU, 2 cores" in text and "in 45 s" in text
    assert "no rows with a bar" in bench_fused.summary([rows[2]])
    assert "0 of 0" not in bench_fused.summary([rows[2]])
    # the JSON it wrote re-renders to the same page
    out = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn", "bench-fused", "--from-json", str(tmp_path / "fused.json"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "fused.md").read_text() == text


def test_shapes_are_described_as_people_write_them():
    from fastbn.tools import cases

    assert cases.parse_shape("64x56x56x64@-1").text == "64x56x56x64 NHWC"
    assert cases.describe_shape((64, 64, 56, 56), 1) == "64x64x56x56 NCHW"
    assert cases.describe_shape((32, 128, 4096), 1) == "32x128x4096 NCL"
    assert cases.describe_shape((8192, 1024), 1) == "8192x1024 NC"
    assert cases.describe_shape((8, 4, 6), 0) == "8x4x6, channels on axis 0"
    assert cases.describe_label("6x5x5x8@-1") == "6x5x5x8 NHWC" and cases.describe_label("8x") == "8x"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ops", "forward_trian"], "unknown operation 'forward_trian'"),
        (["--shapes", "64xAx56"], "'64xAx56' is not a shape"),
        (["--shapes", "8x4@2"], "channel axis 2 is out of range"),
        (["--dtypes", "float8"], "unknown dtype 'float8'"),
        (["--peers", "mxnet"], "unknown peer 'mxnet'"),
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
        [
            sys.executable,
            "-m",
            "fastbn",
            "bench-fused",
            "--shapes",
            "32x4x5x5,32x5x5x4@-1",
            "--repeats",
            "1",
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "fused.md").read_text()
    assert "python -m fastbn bench-fused --shapes 32x4x5x5,32x5x5x4@-1" in report
    rows = json.loads((out / "fused.json").read_text())["rows"]
    # every variant on both shapes (ghost batches of 16 divide 32), and both forms give the same results
    assert {(r["direction"], r["variant"], r["shape"]) for r in rows} == {
        (d, v, s)
        for s in ("32x4x5x5", "32x5x5x4@-1")
        for d, v in [
            ("forward", "relu"),
            ("forward", "add_relu"),
            ("forward", "ghost"),
            ("forward", "renorm"),
            ("backward", "relu"),
            ("backward", "add_relu"),
        ]
    }
    assert all(r["agree"] for r in rows)
    bad = subprocess.run(
        [sys.executable, "-m", "fastbn", "bench-fused", "--shapes", "8x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert bad.returncode != 0 and "'8x' is not a shape" in bad.stderr


def test_help_names_every_command_and_the_library_imports_no_tool(tmp_path):
    """``python -m fastbn --help`` lists every command; ``import fastbn`` and a forward leave fastbn.tools
    unimported (the tools depend on the library, never the other way)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    listed = re.search(r"\{([a-z,-]+)\}", proc.stdout)
    assert listed, proc.stdout
    assert {"demo", "startup", "ptx", "bench", "bench-fused", "plan", "torch-suite"} <= set(
        listed.group(1).split(",")
    ), proc.stdout
    script = (
        "import sys, numpy as np, fastbn; fastbn.forward(np.ones((4, 3), np.float32)); "
        "print([m for m in sys.modules if m.startswith('fastbn.tools')])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_roofline_copies_copy_and_each_row_takes_the_fastest_bandwidth_that_bounds_it():
    import numpy as np

    import fastbn
    from fastbn.tools import cases, roofline

    fastbn.threading_layer()
    src = np.random.default_rng(0).standard_normal(300_001).astype(np.float16)  # odd: not whole 4-byte words
    dst = np.zeros_like(src)
    measured = roofline.measure(src, dst, 1, 1, cases.time_interleaved)
    assert set(measured) == {*roofline.COPIES, roofline.READ} and all(v > 0 for v in measured.values())
    assert np.array_equal(dst[:-1], src[:-1])  # the last copy ran to the last whole word
    beyond = {
        "np.copyto, 1 thread": 10.0,
        "prange copy, ordinary stores": 12.0,
        "prange copy, non-temporal stores": 20.0,
    }
    beyond["prange read"] = 30.0
    own = dict(beyond, **{"prange copy, ordinary stores": 50.0})  # a tensor in cache copies faster
    assert roofline.row_bandwidth("forward_eval", beyond) == (20.0, "prange copy, non-temporal stores, beyond the LLC")
    assert roofline.row_bandwidth("forward_eval", beyond, own)[0] == 50.0
    assert roofline.row_bandwidth("moments", beyond) == (30.0, "prange read, beyond the LLC")  # reading only
    assert roofline.best_copy(beyond) == ("prange copy, non-temporal stores", 20.0)
    assert roofline.copy_bytes(32 << 20) == 256 << 20 and roofline.copy_bytes(105 << 20, memory=4 << 30) == 256 << 20


def test_bench_torch_writes_the_readme_fragment_it_is_spliced_from(tmp_path, monkeypatch):
    """``bench-torch`` writes, by default, the file the README's generated section is copied from."""
    pytest.importorskip("torch")
    import argparse

    import torch

    from fastbn.backends.cpu.machine import machine
    from fastbn.tools import bench_torch, readme

    parser = argparse.ArgumentParser()
    bench_torch.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["bench-torch"]).out == os.path.join(*readme.FRAGMENTS["bench-torch"].path.split("/"))

    monkeypatch.setattr(bench_torch, "CASES", [case for case in bench_torch.CASES if case[1] == (32, 64)])
    out = tmp_path / "results" / "bench_torch.md"
    assert bench_torch.run(argparse.Namespace(rounds=1, seconds=0.001, threads=0, out=str(out))) == 0
    lines = out.read_text().splitlines()
    assert f"torch {torch.__version__}" in lines[0] and machine().describe() in lines[0], lines[0]
    rows = [line.split(" | ") for line in lines if line.startswith("| forward")]
    assert [row[0] for row in rows] == ["| forward, training", "| forward+backward, training"], lines
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0 and row[6].endswith("x |"), row
    floor = [line for line in lines if line.startswith("Floor of a forward+backward defined in Python")]
    assert len(floor) == 1, lines
    figures = [float(word) for word in floor[0].replace(",", " ").split() if word.replace(".", "", 1).isdigit()]
    node, kernels, together = figures[-3:]
    assert node > 0 and kernels > 0 and abs(together - node - kernels) < 0.11, floor
    assert lines[-1] == "Measured by `python -m fastbn bench-torch`."
