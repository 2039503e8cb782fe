"""What ``python -m fastbn bench`` writes: the Markdown report, the README snippet, JSON, charts.

:func:`machine_info` gathers what the report says about the machine and the
libraries; :func:`write_report` writes ``report.md``, ``README_snippet.md``
and ``results.json`` from the result rows of :mod:`fastbn.tools.bench`, and
:func:`write_charts` draws ``bench.png`` and ``scaling.png`` (matplotlib,
optional).  ``python -m fastbn bench-fused`` reuses the machine line.

NumPy is the only import at module level.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import numpy as np

from fastbn.tools.cases import MB, torch_available


# ------------------------------------------------------------ machine info ---
def machine_info():
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
    info = {
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
_NAMES = {"forward_train": "forward, training", "forward_eval": "forward, eval",
          "backward_train": "backward, training", "moments": "moments"}


def _fmt_ms(value):
    return "n/a" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def _fmt_x(value):
    return "n/a" if value is None else f"{value:.1f}x"


def _shape_cell(row):
    dims = "x".join(map(str, row["dims"]))
    return f"({dims}), axis {row['axis']}"


def _bar_cell(row):
    parts = []
    torch_check = row["checks"].get("torch")
    if torch_check:
        mark = "pass" if torch_check["ok"] else "**miss**"
        parts.append(f"PyTorch >= {torch_check['need']:.1f}x: {mark}")
    roof = row["checks"].get("roofline")
    if roof:
        mark = "pass" if roof["ok"] else "**miss**"
        alloc = "pass" if roof["ok_with_page_in"] else "**miss**"
        parts.append(f"roofline >= 60%: {mark} ({alloc} with page-in)")
    return "; ".join(parts) if parts else "-"


def results_table(results, libraries, with_bar=True):
    """The main Markdown table, one row per case."""
    header = ["operation", "shape", "dtype", "MB", "fastbn ms", "GB/s", "% roofline", "% roofline + page-in",
              "reused output ms (% roofline)"]
    if "numpy" in libraries:
        header += ["NumPy ms", "vs NumPy"]
    if "torch" in libraries:
        header += ["PyTorch ms", "vs PyTorch"]
    if with_bar:
        header.append("bar")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [_NAMES[row["operation"]], _shape_cell(row), row["dtype"], f"{row['bytes'] / MB:.1f}",
                 _fmt_ms(row["fastbn_ms"]), f"{row['gb_s']:.1f}", f"{row['roofline_pct']:.0f}%",
                 f"{row['roofline_alloc_pct']:.0f}%",
                 "-" if "reused_ms" not in row else
                 f"{_fmt_ms(row['reused_ms'])} ({row['reused_roofline_pct']:.0f}%)"]
        if "numpy" in libraries:
            cells += [_fmt_ms(row.get("numpy_ms")), _fmt_x(row.get("vs_numpy"))]
        if "torch" in libraries:
            cells += [_fmt_ms(row.get("torch_ms")), _fmt_x(row.get("vs_torch"))]
        if with_bar:
            cells.append(_bar_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_summary(results):
    """Lines saying, for each part of the bar, how many rows pass and which miss."""
    lines = []
    torch_rows = [r for r in results if "torch" in r["checks"]]
    if torch_rows:
        misses = [r for r in torch_rows if not r["checks"]["torch"]["ok"]]
        lines.append(f"- Speed-up against PyTorch (2x everywhere; 3.5x training forward and 2.5x training backward "
                     f"on channel-slab shapes): {len(torch_rows) - len(misses)} of {len(torch_rows)} rows pass."
                     + ("" if not misses else " Missed: " + "; ".join(
                         f"{_NAMES[r['operation']]} {r['shape']} {r['dtype']} ({r['vs_torch']:.2f}x, "
                         f"needs {r['checks']['torch']['need']:.1f}x)" for r in misses) + "."))
    else:
        lines.append("- Speed-up against PyTorch: not measured (PyTorch is not installed).")
    roof_rows = [r for r in results if "roofline" in r["checks"]]
    if roof_rows:
        misses = [r for r in roof_rows if not r["checks"]["roofline"]["ok"]]
        misses_alloc = [r for r in roof_rows if not r["checks"]["roofline"]["ok_with_page_in"]]
        line = (f"- At least 60% of the minimal-traffic roofline on tensors of 48 MB or more: "
                f"{len(roof_rows) - len(misses)} of {len(roof_rows)} rows pass against the DRAM-only roofline")
        if misses:
            line += " (missed: " + "; ".join(
                f"{_NAMES[r['operation']]} {r['shape']} {r['roofline_pct']:.0f}%" for r in misses) + ")"
        line += (f"; {len(roof_rows) - len(misses_alloc)} of {len(roof_rows)} when the roofline includes paging "
                 "in the freshly allocated output")
        if misses_alloc:
            line += " (missed: " + "; ".join(
                f"{_NAMES[r['operation']]} {r['shape']} {r['roofline_alloc_pct']:.0f}%" for r in misses_alloc) + ")"
        lines.append(line + ".")
    if torch_rows or roof_rows:
        reused_torch = sum(r["checks"]["torch"]["ok_reused"] for r in torch_rows)
        reused_roof = sum(r["checks"]["roofline"]["ok_reused"] for r in roof_rows)
        lines.append(f"- With a reused output buffer instead of a fresh one (the reused-output column: fastbn's kernels "
                     f"without the page-in, i.e. what an `out=` argument would give; not a public call today): "
                     f"{reused_torch} of {len(torch_rows)} rows would pass the PyTorch bar and {reused_roof} of "
                     f"{len(roof_rows)} the roofline bar.")
    bad = [r for r in results if not r["error_ok"]]
    lines.append("- Results against a float64 NumPy oracle: "
                 + ("all within tolerance." if not bad else "**outside tolerance**: " + "; ".join(
                     f"{r['operation']} {r['shape']} {r['dtype']} ({r['error']:.1e})" for r in bad) + "."))
    return "\n".join(lines)


def machine_line(info):
    """One sentence naming the CPU, its cores and caches, the memory, and each library's version and threads."""
    parts = [info["machine"]]
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    threads = f"fastbn {info['fastbn']} on {info['fastbn_threads']} threads (Numba {info['numba']}, " \
              f"{info['threading_layer']} layer)"
    if "torch" in info:
        threads += f", PyTorch {info['torch']} on {info['torch_threads']} threads (its default)"
    return "; ".join(parts) + ". " + threads + f", NumPy {info['numpy']}, Python {info['python']}."


_DEFINITIONS = """\
How to read it:

- **ms**: median wall time of one call through the public API (`fastbn.forward`, `fastbn.backward`,
  `fastbn.moments`), after warm-up calls, so compilation never counts. Like PyTorch and NumPy, every call
  returns a newly allocated output. fastbn takes outputs of 1 MiB or more from its output pool
  (`fastbn/backends/cpu/alloc.py`, off with `FASTBN_POOL_BYTES=0`), so in this loop each reuses the already
  paged-in memory of the previous call's output.
- **GB/s**: the operation's minimal DRAM traffic divided by its time.
- **% roofline**: the minimal-traffic time divided by fastbn's time. The minimal traffic is, in tensor-sized
  passes: forward eval 2 (read x, write y), moments 1; training forward 2 and backward 3 when one channel's data
  fits in a core's share of cache (its L2 and its share of L3), else 3 and 5. It is converted to time at the
  bandwidth of `np.copyto` into an existing array of the same size, measured in the same run.
- **% roofline + page-in**: the same, with the cost of paging in one freshly allocated output added to the
  roofline (measured as `np.copyto` into a new array minus `np.copyto` into an existing one). A new array's pages
  are zeroed by the operating system on first touch; every allocating library pays this.
- **reused output ms**: a diagnostic, not a public call: fastbn's kernels writing into an output allocated and
  touched once beforehand (what an `out=` argument would give), with its fraction of the DRAM roofline.
- **vs NumPy / vs PyTorch**: their median time divided by fastbn's. NumPy is the straightforward whole-array
  formula (`x.mean`, `x.var`, broadcasting); PyTorch is `torch.nn.functional.batch_norm` (with running
  statistics in training), its autograd backward (dx, dweight, dbias), and `torch.var_mean` for the moments.
"""


def findings(results):
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
            + (": fastbn's output pool does (each call reuses the paged-in memory of the previous, dead output)"
               if alloc.POOL.cap else "; fastbn's output pool is off here (FASTBN_POOL_BYTES=0), so fastbn pays it")
            + ". Whether a PyTorch call pays it depends on whether its allocator (glibc's malloc) hands back "
            "recycled memory, which this benchmark does not control; a PyTorch time below the DRAM roofline plus "
            "page-in means it did not. It is what separates the DRAM-only roofline column from the one with "
            "page-in, and the reused-output column shows fastbn's kernels without it."
        )
    if any(r.get("torch_ms") for r in results):
        fast = [r for r in results if r.get("torch_ms") and r["torch_ms"] < 2 * r["roofline_ms"]]
        if fast:
            names = "; ".join(f"{_NAMES.get(r['operation'], r['operation'])} {r['shape']} "
                              f"{r['dtype']} ({r['torch_ms']:.2f} ms against a roofline of "
                              f"{r['roofline_ms']:.2f} ms)" for r in fast)
            lines.append(
                "Where PyTorch itself runs in less than twice the minimal-traffic roofline time, running twice as "
                "fast as PyTorch would take more than the memory bandwidth this machine has: in this run, "
                f"{names}."
            )
    half = [r for r in results if r["dtype"] == "float16"]
    if half:
        lines.append(
            "float16 statistics accumulate in float64 like every other dtype (fastbn's numerics policy): "
            "widening each half value to double and the double-precision arithmetic cost more CPU time on "
            "this machine than moving its 2 bytes, so float16 runs at the speed of the arithmetic rather than "
            "of memory. PyTorch accumulates half input in float32."
        )
    return "\n\n".join(lines)


def write_report(out_dir, info, results, libraries, sizes, threads, compile_times, command, charts):
    """Write report.md, README_snippet.md and results.json into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = results_table(results, libraries)
    summary = bar_summary(results)
    chart_lines = [f"![{title}]({os.path.basename(path)})" for title, path in charts]
    sections = [
        "# fastbn CPU benchmark", "",
        f"Generated by `{command}` on {info['date']}.", "",
        "Machine: " + machine_line(info),
        f"Load average before the run {info.get('load_before', 'n/a')}, after {info.get('load_after', 'n/a')}.", "",
        table, "", _DEFINITIONS, findings(results), "", "## The bar", "", summary, "",
    ]
    sections += _copy_section(results)
    if compile_times:
        sections += _compile_section(compile_times)
    if threads:
        sections += _thread_section(threads)
    if sizes:
        sections += _size_section(sizes)
    sections += ["## Charts", ""] + chart_lines
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(sections) + "\n")

    snippet_dir = _display_path(out_dir)
    snippet = [
        "## Performance", "",
        f"<!-- Generated by `{command}` ({info['date']}); regenerate rather than edit. -->", "",
        "Measured on " + machine_line(info), "",
        results_table(results, libraries, with_bar=False), "",
        _DEFINITIONS,
        findings(results), "",
        "Against the bar set for this release (at least 2x PyTorch everywhere; 3.5x training forward and 2.5x "
        "training backward on channel-slab shapes; 60% of the roofline on tensors of 48 MB or more):", "",
        summary, "",
    ]
    snippet += [f"![{title}]({snippet_dir}/{os.path.basename(path)})" for title, path in charts]
    snippet += ["", f"Full report, thread and size sweeps and compile times: `{snippet_dir}/report.md`. "
                    f"Reproduce with `{command}`."]
    snippet_path = os.path.join(out_dir, "README_snippet.md")
    with open(snippet_path, "w") as f:
        f.write("\n".join(snippet) + "\n")

    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump({"command": command, "machine": info, "results": results, "sizes": sizes, "threads": threads,
                   "compile": compile_times}, f, indent=1)
    return report, snippet_path, json_path


def _display_path(path):
    relative = os.path.relpath(os.path.abspath(path), os.getcwd())
    return path if relative.startswith("..") else relative


def _copy_section(results):
    seen = {}
    for row in results:
        seen.setdefault((row["shape"], row["dtype"]), row)
    lines = ["## The copy the roofline is measured with", "",
             "| shape | dtype | MB | `np.copyto` into an existing array, ms | GB/s (read + write) | "
             "into a new array, ms | page-in of one output, ms |", "|---|---|---|---|---|---|---|"]
    for row in seen.values():
        lines.append(f"| {_shape_cell(row)} | {row['dtype']} | {row['bytes'] / MB:.1f} | {_fmt_ms(row['copy_ms'])} | "
                     f"{2 * row['bytes'] / row['copy_ms'] / 1e6:.1f} | {_fmt_ms(row['copy_fresh_ms'])} | "
                     f"{_fmt_ms(row['page_in_ms'])} |")
    return lines + [""]


def _compile_section(compile_times):
    lines = ["## Compile time", ""]
    if "error" in compile_times:
        return lines + [f"Not measured: {compile_times['error']}", ""]
    lines += ["First call of each operation in a fresh interpreter with an empty Numba cache (float32, "
              f"small input; it compiles the kernels that call needs), then a second call. `import fastbn`: "
              f"{1e3 * compile_times['import']:.0f} ms.", "",
              "| operation | first call (compiles) | second call |", "|---|---|---|"]
    for name, value in compile_times.items():
        if name == "import":
            continue
        first, second = value
        lines.append(f"| {name} | {first:.2f} s | {1e3 * second:.2f} ms |")
    return lines + [""]


def _thread_section(threads):
    names = [k for k in threads[0] if k != "shape"]
    lines = ["## Thread count", "", "Median ms, float32, each library limited to 1 and to 2 threads.", "",
             "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in threads:
        lines.append(f"| {row['shape']} | " + " | ".join(_fmt_ms(row.get(n)) for n in names) + " |")
    return lines + [""]


def _size_section(sizes):
    names = [k for k in sizes[0] if k not in ("channels", "bytes")]
    lines = ["## Tensor size", "", "Median ms, float32 (80, C, 56, 56), fastbn on its default threads.", "",
             "| MB | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in sizes:
        lines.append(f"| {row['bytes'] / MB:.0f} | " + " | ".join(_fmt_ms(row.get(n)) for n in names) + " |")
    return lines + [""]


# ---------------------------------------------------------------- charts ---
def write_charts(out_dir, results, libraries, sizes, threads):
    """Write bench.png (and scaling.png with the sweeps); returns [(title, path)], [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("python -m fastbn bench: matplotlib is not installed, so no chart was drawn "
              "(pip install 'fastbn[bench]')", file=sys.stderr)
        return []
    charts = []
    labels = [f"{_NAMES[r['operation']]}\n{r['shape']} {r['dtype']}" for r in results]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(results) + 1.5))
    positions = np.arange(len(results))
    series = [("fastbn", "fastbn_ms", "#1f77b4")]
    if "torch" in libraries:
        series.append(("PyTorch", "torch_ms", "#d62728"))
    if "numpy" in libraries:
        series.append(("NumPy", "numpy_ms", "#7f7f7f"))
    height = 0.8 / len(series)
    for k, (name, key, color) in enumerate(series):
        values = [r.get(key, np.nan) for r in results]
        ax.barh(positions + (k - (len(series) - 1) / 2) * height, values, height, label=name, color=color)
    ax.scatter([r["roofline_ms"] for r in results], positions, marker="|", s=300, color="black", zorder=3,
               label="roofline (minimal DRAM traffic)")
    ax.scatter([r["roofline_alloc_ms"] for r in results], positions, marker="|", s=300, color="#999999",
               zorder=3, label="roofline + paging in a fresh output")
    ax.set_yticks(positions, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per call (median, log scale)")
    ax.set_title("Batch norm on the CPU: fastbn, PyTorch, NumPy and the memory roofline", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(results) - 0.02), ncol=3)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    charts.append(("fastbn, PyTorch and NumPy against the roofline", path))

    if sizes or threads:
        panels = [p for p in (sizes, threads) if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        axes = axes[0]
        panel = 0
        if sizes:
            ax = axes[panel]
            panel += 1
            megabytes = np.array([p["bytes"] / MB for p in sizes])
            for name in [k for k in sizes[0] if k not in ("channels", "bytes")]:
                style = "--" if name.startswith("torch") or name == "copy" else "-"
                ax.plot(megabytes, [p[name] for p in sizes], style, marker="o", markersize=3,
                        label=name if name != "copy" else "np.copyto (roofline pace)")
            reference = np.array([megabytes[0], megabytes[-1]])
            ref_time = sizes[-1]["forward_train"] * reference / megabytes[-1]
            ax.plot(reference, ref_time, ":", color="black", label="linear growth")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tensor size, MB (float32 (80, C, 56, 56))")
            ax.set_ylabel("ms per call (median)")
            ax.set_title("Time against tensor size", fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
        if threads:
            ax = axes[panel]
            names = [k[: -len(" @1")] for k in threads[0] if k.endswith(" @1")]
            width = 0.8 / (2 * len(names))
            positions = np.arange(len(threads))
            k = 0
            for name in names:
                for count in (1, 2):
                    values = [row.get(f"{name} @{count}", np.nan) for row in threads]
                    ax.bar(positions + (k - (2 * len(names) - 1) / 2) * width, values, width,
                           label=f"{name}, {count} thread{'s' if count > 1 else ''}",
                           alpha=0.55 if count == 1 else 1.0,
                           color=f"C{names.index(name)}")
                    k += 1
            ax.set_xticks(positions, [row["shape"] for row in threads], fontsize=7, rotation=15)
            ax.set_ylabel("ms per call (median)")
            ax.set_title("Time against thread count (1 and 2)", fontsize=10)
            ax.legend(fontsize=6, ncol=2)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        charts.append(("time against tensor size and thread count", path))
    return charts
