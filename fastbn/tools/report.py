"""What ``python -m fastbn bench`` writes: the Markdown report, the README snippet, JSON, charts.

:func:`machine_info` gathers what the report says about the machine and the
libraries; :func:`write_report` writes ``report.md``, ``README_snippet.md``
and ``results.json`` from the result rows of :mod:`fastbn.tools.bench`, and
:func:`fastbn.tools.charts.write_charts` draws ``bench.png`` and
``scaling.png`` (matplotlib, optional), each titled with the machine.  The report's main table
(:func:`results_table`) has at most 8 columns, what a reader compares; the
diagnostic figures are in a second table (:func:`diagnostics_table`).  Shapes
are written as sizes and layout (``64x56x56x64 NHWC``), never the command
line's ``@-1``.  ``python -m fastbn bench --from-json`` re-renders all of it
from a results.json; ``python -m fastbn bench-fused`` reuses the machine line.

NumPy is the only import at module level.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fastbn.tools.cases import LIBRARY_NAMES, MB, PEERS, Row, SweepRow, describe_label, describe_shape, torch_available


# ------------------------------------------------------------ machine info ---
def machine_info() -> dict[str, Any]:
    """A dict describing the machine and the libraries' thread counts.

    The CPU model, cores and caches come from
    :func:`fastbn.backends.cpu.machine.machine`, the facts the CPU plan itself
    rests on, so the report describes the machine the plan saw.
    """
    import numba

    import fastbn
    from fastbn.backends.cpu.machine import machine

    # Start fastbn's threading layer before anything asks Numba for threads:
    # numba.get_num_threads() would otherwise start Numba's default layer.
    layer = fastbn.threading_layer()
    facts = machine()
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": facts.model,
        "cpus": facts.cores,
        "machine": facts.describe(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastbn": fastbn.__version__,
        "fastbn_threads": numba.get_num_threads(),
        "threading_layer": layer,
        "core_cache_bytes": facts.core_cache_bytes,
        "l3_bytes": facts.l3_bytes,
        "extensions": list(facts.extensions),
        "vector_bytes": facts.vector_bytes,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["load_before"] = round(os.getloadavg()[0], 2)
    return info


# --------------------------------------------------------------- report ---
_NAMES = {
    "forward_train": "forward, training",
    "forward_eval": "forward, eval",
    "backward_train": "backward, training",
    "moments": "moments",
}

# What the main table's "release bar" column and the summary say the bar is.
_BAR_TEXT = (
    "at least 3x the fastest peer on every float32 row and 2x on float16 rows; at least 80% of the roofline "
    "on tensors beyond the cache; no figure above 100% of its roofline"
)


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def _fmt_x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def _shape_cell(row: Row) -> str:
    """``64x56x56x64 NHWC``: sizes and layout, never the command line's ``@-1``."""
    return describe_shape(row["dims"], row["axis"])


def _case_text(row: Row) -> str:
    """``forward, training 64x56x56x64 NHWC float16``, for sentences."""
    return f"{_NAMES.get(row['operation'], row['operation'])} {_shape_cell(row)} {row['dtype']}"


def _peer_name(name: str) -> str:
    return LIBRARY_NAMES.get(name, name)


def _bar_words(row: Row) -> str:
    """The main table's bar cell, in words: ``met (≥ 3.0x the fastest peer, ≥ 80% of roofline)``, or what missed."""
    checks = row["checks"]
    if not checks:
        return "n/a"
    targets, misses = [], []
    peer = checks.get("peer")
    if peer:
        targets.append(f"≥ {peer['need']:.1f}x the fastest peer")
        if not peer["ok"]:
            misses.append(f"{row['vs_fastest_peer']:.2f}x {_peer_name(row['fastest_peer'])}, needs {peer['need']:.1f}x")
    roof = checks.get("roofline")
    if roof:
        targets.append(f"≥ {roof['need']:.0f}% of roofline")
        if not roof["ok"]:
            misses.append(f"{row['roofline_pct']:.0f}% of roofline, needs {roof['need']:.0f}%")
    if misses:
        return "**missed**: " + "; ".join(misses)
    return "met (" + ", ".join(targets) + ")"


def _bar_checks(row: Row) -> str:
    """The diagnostics table's bar cell: every check and its outcome, with and without page-in."""
    parts: list[str] = []
    peer = row["checks"].get("peer")
    if peer:
        mark = "pass" if peer["ok"] else "**miss**"
        reused = "pass" if peer["ok_reused"] else "miss"
        parts.append(f"fastest peer ≥ {peer['need']:.1f}x: {mark} (reused output: {reused})")
    roof = row["checks"].get("roofline")
    if roof:
        mark = "pass" if roof["ok"] else "**miss**"
        alloc = "pass" if roof["ok_with_page_in"] else "miss"
        reused = "pass" if roof["ok_reused"] else "miss"
        parts.append(f"roofline ≥ {roof['need']:.0f}%: {mark} (with page-in: {alloc}; reused output: {reused})")
    return "; ".join(parts) if parts else "-"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def results_table(results: Iterable[Row], libraries: Sequence[str], with_bar: bool = True) -> str:
    """The main Markdown table, one row per case: at most 8 columns, what a reader compares.

    operation, shape and layout, dtype, fastbn's time, its bandwidth and
    fraction of the roofline, the fastest peer on the row and fastbn's
    speed-up over it (the headline), and whether the row meets the release
    bar (``with_bar``).  Every peer's time is in :func:`peers_table`, the
    other figures in :func:`diagnostics_table`.
    """
    with_peers = any(name in libraries for name in PEERS)
    header = ["operation", "shape", "dtype", "fastbn ms", "GB/s (% of roofline)"]
    if with_peers:
        header += ["fastest peer, ms", "vs fastest peer"]
    if with_bar:
        header.append("release bar")
    rows = []
    for row in results:
        cells = [
            _NAMES[row["operation"]],
            _shape_cell(row),
            row["dtype"],
            _fmt_ms(row["fastbn_ms"]),
            f"{row['gb_s']:.1f} ({row['roofline_pct']:.0f}%)",
        ]
        if with_peers:
            if "fastest_peer" in row:
                cells += [
                    f"{_peer_name(row['fastest_peer'])} {_fmt_ms(row['fastest_peer_ms'])}",
                    f"**{_fmt_x(row['vs_fastest_peer'])}**",
                ]
            else:
                cells += ["n/a", "n/a"]
        if with_bar:
            cells.append(_bar_words(row))
        rows.append(cells)
    return _markdown(header, rows)


def peers_table(results: Iterable[Row], libraries: Sequence[str]) -> str:
    """Every implementation's median ms on each row, side by side, the fastest in bold; n/a where not timed."""
    names = ["fastbn"] + [name for name in PEERS if name in libraries]
    header = ["operation", "shape", "dtype", "roofline ms", *(f"{_peer_name(n)} ms" for n in names)]
    rows = []
    for row in results:
        times = {name: row.get(f"{name}_ms") for name in names}
        fastest = min((t for t in times.values() if t), default=None)
        cells = [_NAMES[row["operation"]], _shape_cell(row), row["dtype"], _fmt_ms(row["roofline_ms"])]
        for name in names:
            value = times[name]
            text = _fmt_ms(value)
            cells.append(f"**{text}**" if value and value == fastest else text)
        rows.append(cells)
    return _markdown(header, rows)


def peer_status_lines(info: Mapping[str, Any]) -> list[str]:
    """One line per peer: its version (and oneDNN for TensorFlow), or that it is absent or left out."""
    found = info.get("peers") or {}
    return [f"- {_peer_name(name)}: {found.get(name, 'not recorded')}" for name in PEERS]


def diagnostics_table(results: Iterable[Row], libraries: Sequence[str]) -> str:
    """The second table: size, passes, where the roofline's bandwidth was measured, page-in, reused output, checks."""
    header = [
        "operation",
        "shape",
        "dtype",
        "MB",
        "DRAM passes",
        "roofline GB/s (measured by)",
        "% of roofline + page-in",
        "reused output ms (% of roofline)",
        "bar checks",
    ]
    rows = []
    for row in results:
        where = row.get("roofline_from", "np.copyto")
        cached = " (in cache)" if row.get("in_cache") else ""
        rows.append(
            [
                _NAMES[row["operation"]],
                _shape_cell(row),
                row["dtype"],
                f"{row['bytes'] / MB:.1f}{cached}",
                str(row["passes"]),
                f"{row.get('roofline_gb_s', 2 * row['bytes'] / row['copy_ms'] / 1e6):.1f} ({where})",
                f"{row['roofline_alloc_pct']:.0f}%",
                "-" if "reused_ms" not in row else f"{_fmt_ms(row['reused_ms'])} ({row['reused_roofline_pct']:.0f}%)",
                _bar_checks(row),
            ]
        )
    return _markdown(header, rows)


def _count(passed: int, total: int) -> str:
    """``3 of 5 rows``; ``all 5 rows``, ``both rows`` or ``the one row`` when every row passes (total >= 1)."""
    if passed < total:
        return f"{passed} of {total} rows"
    return {1: "the one row", 2: "both rows"}.get(total, f"all {total} rows")


def bar_summary(results: Sequence[Row]) -> str:
    """Lines saying, for each part of the bar, how many rows pass and which miss (never "0 of 0")."""
    lines = []
    peer_rows = [r for r in results if "peer" in r["checks"]]
    if peer_rows:
        misses = [r for r in peer_rows if not r["checks"]["peer"]["ok"]]
        line = (
            "- Speed-up against the fastest peer on each row (3x on float32, 2x on float16): "
            f"{_count(len(peer_rows) - len(misses), len(peer_rows))} pass."
        )
        if misses:
            line += (
                " Missed: "
                + "; ".join(
                    f"{_case_text(r)} ({r['vs_fastest_peer']:.2f}x {_peer_name(r['fastest_peer'])}, "
                    f"needs {r['checks']['peer']['need']:.1f}x)"
                    for r in misses
                )
                + "."
            )
        lines.append(line)
    else:
        lines.append("- Speed-up against the peers: not measured (no peer is installed, or all were left out).")
    roof_rows = [r for r in results if "roofline" in r["checks"]]
    if roof_rows:
        misses = [r for r in roof_rows if not r["checks"]["roofline"]["ok"]]
        line = (
            "- At least 80% of the roofline on tensors beyond the cache: "
            f"{_count(len(roof_rows) - len(misses), len(roof_rows))} pass"
        )
        if misses:
            ordered = sorted(misses, key=lambda r: r["roofline_pct"])
            line += (
                " (missed, furthest first: "
                + "; ".join(f"{_case_text(r)} {r['roofline_pct']:.0f}%" for r in ordered)
                + ")"
            )
        lines.append(line + ".")
    else:
        lines.append(
            "- At least 80% of the roofline: no rows with a roofline bar (every tensor of this run fits in cache)."
        )
    over = [(r, name, pct) for r in results for name, pct in r.get("over_roofline", {}).items()]
    if over:
        lines.append(
            "- **Above 100% of the roofline** (the roofline is then not a limit: its measurement is wrong, and no "
            "figure is clipped): "
            + "; ".join(f"{_case_text(r)}: {_peer_name(name)} at {pct:.0f}%" for r, name, pct in over)
            + "."
        )
    else:
        lines.append("- No figure above 100% of its roofline (fastbn's, its reused-output kernels' or any peer's).")
    reused = []
    if peer_rows:
        passed = sum(r["checks"]["peer"]["ok_reused"] for r in peer_rows)
        reused.append(f"{_count(passed, len(peer_rows))} would pass the peer bar")
    if roof_rows:
        passed = sum(r["checks"]["roofline"]["ok_reused"] for r in roof_rows)
        reused.append(f"{_count(passed, len(roof_rows))} the roofline bar")
    if reused:
        lines.append(
            "- With a reused output buffer instead of a fresh one (the diagnostics' reused-output column: fastbn's "
            "kernels without the page-in, i.e. what an `out=` argument would give; not a public call today): "
            + " and ".join(reused)
            + "."
        )
    checked = [(err, name, r) for r in results for name, err in (r.get("peer_errors") or {}).items()]
    if checked:
        err, name, r = max(checked, key=lambda item: item[0])
        lines.append(
            f"- The peers' forward outputs against the same float64 oracle: largest relative error {err:.1e} "
            f"({_peer_name(name)}, {_case_text(r)}), so each computes the same batch norm."
        )
    bad = [r for r in results if not r["error_ok"]]
    lines.append(
        "- Results against a float64 NumPy oracle: "
        + (
            "all within tolerance."
            if not bad
            else "**outside tolerance**: " + "; ".join(f"{_case_text(r)} ({r['error']:.1e})" for r in bad) + "."
        )
    )
    return "\n".join(lines)


def machine_line(info: Mapping[str, Any]) -> str:
    """One sentence naming the CPU, its cores and caches, the memory, and each library's version and threads."""
    parts = [info["machine"]]
    if "extensions" in info:
        parts.append(
            "vector extensions " + (", ".join(info["extensions"]) or "none of avx2/avx512f/avx512_bf16/avx512_fp16")
        )
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    threads = (
        f"fastbn {info['fastbn']} on {info['fastbn_threads']} threads (Numba {info['numba']}, "
        f"{info['threading_layer']} layer)"
    )
    if "torch" in info:
        threads += f", PyTorch {info['torch']} on {info['torch_threads']} threads (its default)"
    return "; ".join(parts) + ". " + threads + f", NumPy {info['numpy']}, Python {info['python']}."


def chart_machine(info: Mapping[str, Any] | None) -> str:
    """The machine as a chart's title names it: CPU, cores and caches; on a second line, each library's threads."""
    if not info:
        return ""
    text = info.get("machine", "")
    if info.get("extensions"):
        text += "; " + ", ".join(info["extensions"])
    threads = f"fastbn on {info['fastbn_threads']} threads" if "fastbn_threads" in info else ""
    if "torch_threads" in info:
        threads += f", PyTorch on {info['torch_threads']} threads"
    return f"{text}\n{threads}" if threads else text


_KEY = """\
- **fastbn ms**: median milliseconds per call through the public API, after warm-up (compilation never counts).
- **GB/s (% of roofline)**: the operation's minimal memory traffic divided by fastbn's time, and the time that
  traffic takes at the best copy bandwidth this machine reached in the same run, as a share of fastbn's time.
- **fastest peer / vs fastest peer**: the fastest of NumPy, PyTorch, JAX, Flax and TensorFlow on the row (those
  installed), and its time divided by fastbn's; above 1x, fastbn is faster.
"""

_DEFINITIONS = (
    """\
How to read them:

- **ms**: median wall time of one call through the public API (`fastbn.forward`, `fastbn.backward`,
  `fastbn.moments`), after warm-up calls, so compilation never counts. Like its peers, every call returns a newly
  allocated output. fastbn takes outputs of 1 MiB or more from its output pool (`fastbn/backends/cpu/alloc.py`,
  off with `FASTBN_POOL_BYTES=0`), so in this loop each reuses the already paged-in memory of the previous call's
  output.
- **roofline**: the operation's minimal traffic, in tensor-sized passes, bytes read plus bytes written: forward
  eval 2 (read x, write y), moments 1 (read x); training forward 2 and backward 3 (read x and dy, write dx) when
  one channel's data fits in a core's share of cache (its L2 and its share of L3), else 3 and 5. It is converted
  to time at the best bandwidth this machine reached in the same run: the fastest of a one-thread `np.copyto`, an
  all-core Numba copy with ordinary stores and one with non-temporal stores, each a median over repeats on an array
  well beyond the last-level cache, and again at the tensor's own size (faster where it fits in cache; moments,
  which only read, may also use an all-core read). A roofline is a limit: a figure above 100% of it would mean
  the measurement is wrong, and the summary names any such figure instead of clipping it.
- **GB/s**: the minimal traffic divided by fastbn's time.
- **the peers**: NumPy is the straightforward whole-array formula (`x.mean`, `x.var`, broadcasting); PyTorch is
  `torch.nn.functional.batch_norm` (with running statistics in training), its autograd backward (dx, dweight,
  dbias), and `torch.var_mean` for the moments; JAX is `jax.jit` of the textbook formula, its backward
  `jax.vjp`; Flax is `flax.linen.BatchNorm` under `jax.jit` (forward only); TensorFlow is its fused batch norm
  (`tf.raw_ops.FusedBatchNormV3` and its gradient under `tf.function`, in the row's own layout, oneDNN's kernel on
  x86) and `tf.nn.moments`. Each library runs on its own default threads (all cores).
- **release bar**: the target set for the row ("""
    + _BAR_TEXT
    + """), met or missed.
- **% of roofline + page-in** (diagnostics): the same, with the cost of paging in one freshly allocated output
  added to the roofline (measured as `np.copyto` into a new array minus `np.copyto` into an existing one). A new
  array's pages are zeroed by the operating system on first touch; every allocating library pays this.
- **reused output ms** (diagnostics): not a public call: fastbn's kernels writing into an output allocated and
  touched once beforehand (what an `out=` argument would give), with its fraction of the roofline.
- **bar checks** (diagnostics): each part of the bar, against the roofline, the roofline with page-in, and with a
  reused output.
"""
)


def findings(results: Sequence[Row]) -> str:
    """A paragraph on what bounds the figures, with this run's numbers."""
    from fastbn.backends.cpu import alloc

    big = [r for r in results if r["dtype"] == "float32" and r["page_in_ms"] > 0.2 * r["copy_ms"]]
    lines = []
    if big:
        row = max(big, key=lambda r: r["bytes"])
        lines.append(
            f"Every call returns a newly allocated output, and paging in a fresh {row['bytes'] / MB:.0f} MB array "
            f"(the OS zeroes each page on first touch) took {row['page_in_ms']:.1f} ms here, against "
            f"{row['copy_ms']:.1f} ms to copy the whole tensor into memory already in use. An allocator that "
            "recycles memory avoids it"
            + (
                ": fastbn's output pool does (each call reuses the paged-in memory of the previous, dead output)"
                if alloc.POOL.cap
                else "; fastbn's output pool is off here (FASTBN_POOL_BYTES=0), so fastbn pays it"
            )
            + ". Whether a PyTorch call pays it depends on whether its allocator (glibc's malloc) hands back "
            "recycled memory, which this benchmark does not control; a PyTorch time below the DRAM roofline plus "
            "page-in means it did not. It is what separates the DRAM-only roofline from the one with "
            "page-in, and the reused-output column shows fastbn's kernels without it."
        )
    fast = [r for r in results if r.get("fastest_peer_ms") and r["fastest_peer_ms"] < 3 * r["roofline_ms"]]
    if fast:
        names = "; ".join(
            f"{_case_text(r)} ({_peer_name(r['fastest_peer'])} {r['fastest_peer_ms']:.2f} ms against a roofline of "
            f"{r['roofline_ms']:.2f} ms)"
            for r in fast
        )
        lines.append(
            "Where the fastest peer itself runs in less than three times the roofline time, running three times as "
            "fast as it would take more than the memory bandwidth this machine has: in this run, "
            f"{names}."
        )
    half = [r for r in results if r["dtype"] == "float16"]
    if half:
        lines.append(
            "float16 statistics accumulate in float32 over blocks of at most 256 elements, added in float64 "
            "(the bound is derived in fastbn/backends/cpu/reductions.py), as PyTorch accumulates half input in "
            "float32; the elementwise passes and the float64 merges still cost CPU time that float16's 2 bytes "
            "per element do not pay for on this machine."
        )
    return "\n\n".join(lines)


def libraries_of(results: Sequence[Row]) -> list[str]:
    """The libraries a list of result rows was timed with (for re-rendering a results.json)."""
    libraries = ["fastbn"]
    for name in PEERS:
        if any(f"{name}_ms" in r for r in results):
            libraries.append(name)
    return libraries


def write_report(
    out_dir: str,
    info: Mapping[str, Any],
    results: Sequence[Row],
    libraries: Sequence[str],
    sizes: Sequence[SweepRow] | None,
    threads: Sequence[SweepRow] | None,
    compile_times: Mapping[str, Any] | None,
    command: str,
    charts: list[tuple[str, str]],
    write_json: bool = True,
) -> tuple[str, str, str]:
    """Write report.md, README_snippet.md and (``write_json``) results.json into ``out_dir``; return their paths.

    The report's main table has at most 8 columns (:func:`results_table`); the
    diagnostic figures follow in a second table (:func:`diagnostics_table`).
    The README snippet is the main table without the bar column, a short key,
    the bar's summary and the charts.
    """
    from fastbn.tools import roofline  # imports Numba: not at module level

    os.makedirs(out_dir, exist_ok=True)
    summary = bar_summary(results)
    chart_lines = [f"![{title}]({os.path.basename(path)})" for title, path in charts]
    sections = [
        "# fastbn CPU benchmark",
        "",
        f"Generated by `{command}` on {info['date']}.",
        "",
        "Machine: " + machine_line(info),
        f"Load average before the run {info.get('load_before', 'n/a')}, after {info.get('load_after', 'n/a')}.",
        "",
        "Other processes may share the machine's cores while it runs, so absolute figures move between runs; "
        "every implementation of a row is timed in the same interleaved rounds, so their ratios move less.",
        "",
        "## Results",
        "",
        results_table(results, libraries),
        "",
        *roofline.section(info, machine_line(info)),
        "## Peers side by side",
        "",
        "Median ms per call of every implementation on each row (the fastest in bold), with the row's roofline:",
        "",
        *peer_status_lines(info),
        "",
        peers_table(results, libraries),
        "",
        "## Diagnostics",
        "",
        "The same rows: tensor size, the passes the roofline counts, the bandwidth that bounds the row and the copy "
        "that reached it, the roofline with the output's page-in, fastbn's kernels on a reused output, and each "
        "check of the bar.",
        "",
        diagnostics_table(results, libraries),
        "",
        _DEFINITIONS,
        findings(results),
        "",
        "## The bar",
        "",
        "The bar set for this release: " + _BAR_TEXT + ".",
        "",
        summary,
        "",
    ]
    sections += roofline.copies_at_each_size(results, _shape_cell, _fmt_ms)
    if compile_times:
        sections += _compile_section(compile_times)
    if threads:
        sections += _thread_section(threads)
    if sizes:
        sections += _size_section(sizes)
    sections += ["## Charts", "", *chart_lines]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(sections) + "\n")

    snippet_dir = _display_path(out_dir)
    snippet = [
        "## Performance",
        "",
        f"<!-- Generated by `{command}` ({info['date']}); regenerate rather than edit. -->",
        "",
        "Measured on " + machine_line(info),
        "",
        results_table(results, libraries, with_bar=False),
        "",
        _KEY,
        "Against the bar set for this release (" + _BAR_TEXT + "):",
        "",
        summary,
        "",
    ]
    roof = info.get("roofline")
    if roof:
        snippet[6:6] = [
            "The roofline: "
            + ", ".join(f"{name} {value:.1f} GB/s" for name, value in roof["gb_s"].items())
            + f" on {roof['bytes'] / 2**20:.0f} MiB (the fastest copy bounds each row).",
            "",
        ]
    snippet += [f"![{title}]({snippet_dir}/{os.path.basename(path)})" for title, path in charts]
    snippet += [
        "",
        f"Full report (diagnostics, definitions, thread and size sweeps, compile times): `{snippet_dir}/report.md`. "
        f"Reproduce with `{command}`.",
    ]
    snippet_path = os.path.join(out_dir, "README_snippet.md")
    with open(snippet_path, "w") as f:
        f.write("\n".join(snippet) + "\n")

    json_path = os.path.join(out_dir, "results.json")
    if write_json:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "command": command,
                    "machine": info,
                    "results": results,
                    "sizes": sizes,
                    "threads": threads,
                    "compile": compile_times,
                },
                f,
                indent=1,
            )
    return report, snippet_path, json_path


def _display_path(path: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.getcwd())
    return path if relative.startswith("..") else relative


def _compile_section(compile_times: Mapping[str, Any]) -> list[str]:
    lines = ["## Compile time", ""]
    if "error" in compile_times:
        return [*lines, f"Not measured: {compile_times['error']}", ""]
    lines += [
        "First call of each operation in a fresh interpreter with an empty Numba cache (float32, "
        f"small input; it compiles the kernels that call needs), then a second call. `import fastbn`: "
        f"{1e3 * compile_times['import']:.0f} ms.",
        "",
        "| operation | first call (compiles) | second call |",
        "|---|---|---|",
    ]
    for name, value in compile_times.items():
        if name == "import":
            continue
        first, second = value
        operation, _, layout = name.partition(" ")
        lines.append(f"| {_NAMES.get(operation, operation)} {layout} | {first:.2f} s | {1e3 * second:.2f} ms |")
    return [*lines, ""]


def _sweep_name(name: str) -> str:
    """``fastbn forward_train @2`` -> ``fastbn forward, training, 2 threads``; sweep keys for people."""
    base, _, count = name.partition(" @")
    words = base.split(" ")
    if words == ["copy"]:
        words = ["np.copyto"]
    elif words[0] in _NAMES:  # the size sweep's fastbn columns carry no library name
        words = ["fastbn", *words]
    text = " ".join({**LIBRARY_NAMES, **_NAMES}.get(w, w) for w in words)
    if count:
        text += f", {count} thread{'s' if count != '1' else ''}"
    return text


def _thread_section(threads: Sequence[SweepRow]) -> list[str]:
    """One row per shape, library and operation: 1 thread, 2 threads, and what the second thread gave."""
    names = [k[: -len(" @1")] for k in threads[0] if k.endswith(" @1")]
    lines = [
        "## Thread count",
        "",
        "Median ms, float32, each library limited to 1 and to 2 threads.",
        "",
        "| shape | library and operation | 1 thread, ms | 2 threads, ms | speed-up from the second thread |",
        "|---|---|---|---|---|",
    ]
    for row in threads:
        for name in names:
            one, two = row.get(f"{name} @1"), row.get(f"{name} @2")
            lines.append(
                f"| {describe_label(row['shape'])} | {_sweep_name(name)} | {_fmt_ms(one)} | {_fmt_ms(two)} | "
                f"{_fmt_x(one / two) if one and two else 'n/a'} |"
            )
    return [*lines, ""]


def sweep_columns(sizes: Sequence[SweepRow]) -> list[str]:
    """The timed columns of a size sweep, forwards first."""
    names = [k for k in sizes[0] if k not in ("rows", "bytes", "channels")]
    return sorted(names, key=lambda n: ("+" in n, names.index(n)))


def _size_section(sizes: Sequence[SweepRow]) -> list[str]:
    names = sweep_columns(sizes)
    what = (
        "Median ms per call, float32 (N, 64), from 2 KB to beyond the last-level cache: a training forward "
        "(`fastbn.forward`), and a forward plus backward (fastbn through `fastbn.torch.batch_norm` and torch's "
        "autograd), each library on its default threads.  The no-op `autograd.Function` column does no work: a "
        "Python autograd function that returns its input and ready-made gradients, the least any extension "
        "written in Python (as `fastbn.torch` is) pays per forward plus backward, where torch's own batch norm "
        "has a C++ autograd node."
    )
    if "channels" in sizes[0]:  # a results.json of an older bench: its sweep was 80xCx56x56
        what = "Median ms, float32 80xCx56x56 NCHW, each library on its default threads."
    lines = [
        "## Tensor size",
        "",
        what,
        "",
        "| KB | " + " | ".join(_sweep_name(n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in sizes:
        lines.append(f"| {row['bytes'] / 1e3:.0f} | " + " | ".join(_fmt_ms(row.get(n)) for n in names) + " |")
    return [*lines, ""]
