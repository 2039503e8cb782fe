"""The charts of ``python -m fastbn bench``: ``bench.png`` and ``scaling.png`` (matplotlib, optional).

Each is titled with the machine (:func:`fastbn.tools.report.chart_machine`),
its axes labelled with units, and its rows named as the report names them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastbn.tools.cases import LIBRARY_NAMES, PEERS, Row, SweepRow, describe_label
from fastbn.tools.report import _NAMES, _shape_cell, _sweep_name, chart_machine, sweep_columns

#: One colour per library, the same in every chart.
COLORS = {
    "fastbn": "#1f77b4",
    "torch": "#d62728",
    "numpy": "#7f7f7f",
    "jax": "#2ca02c",
    "flax": "#bcbd22",
    "tensorflow": "#ff7f0e",
}


# ---------------------------------------------------------------- charts ---
def _plain_log_ticks(axis: Any) -> None:
    """Tick labels of a log axis as plain numbers (0.1, 2, 50), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))


def write_charts(
    out_dir: str,
    results: Sequence[Row],
    libraries: Sequence[str],
    sizes: Sequence[SweepRow] | None,
    threads: Sequence[SweepRow] | None,
    info: Mapping[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """Write bench.png (and scaling.png with the sweeps); returns [(title, path)], [] without matplotlib.

    ``info`` (:func:`machine_info`) names the machine in each chart's title.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "python -m fastbn bench: matplotlib is not installed, so no chart was drawn (pip install 'fastbn[bench]')",
            file=sys.stderr,
        )
        return []
    machine_text = chart_machine(info)
    charts: list[tuple[str, str]] = []
    labels = [f"{_NAMES[r['operation']]}\n{_shape_cell(r)} {r['dtype']}" for r in results]
    # Constrained layout with the legend outside the axes, below the x-axis label: it never covers the bars
    # or the label, however few rows there are.
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(results) + 2.6), layout="constrained")
    positions = np.arange(len(results))
    series = [
        (LIBRARY_NAMES[name], f"{name}_ms", COLORS[name])
        for name in ("fastbn", *PEERS)
        if name in libraries and any(r.get(f"{name}_ms") for r in results)
    ]
    height = 0.8 / len(series)
    for k, (name, key, color) in enumerate(series):
        values = [r.get(key, np.nan) for r in results]
        ax.barh(positions + (k - (len(series) - 1) / 2) * height, values, height, label=name, color=color)
    ax.scatter(
        [r["roofline_ms"] for r in results],
        positions,
        marker="|",
        s=300,
        color="black",
        zorder=3,
        label="roofline (minimal traffic at the best copy bandwidth)",
    )
    ax.scatter(
        [r["roofline_alloc_ms"] for r in results],
        positions,
        marker="|",
        s=300,
        color="#999999",
        zorder=3,
        label="roofline + paging in a fresh output",
    )
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_ylim(len(results) - 0.5, -0.5)  # first row on top, no empty margin
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("time per call, ms (median; log scale; shorter is faster)")
    title = "Batch norm on the CPU: fastbn, its peers and the memory roofline"
    fig.suptitle(title + (f"\n{machine_text}" if machine_text else ""), fontsize=9)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3)
    ax.grid(axis="x", alpha=0.3, which="both")
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    charts.append(("fastbn and its peers against the roofline", path))

    if sizes or threads:
        panels = [p for p in (sizes, threads) if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False, layout="constrained")
        axes = axes[0]
        panel = 0
        if sizes:
            ax = axes[panel]
            panel += 1
            kilobytes = np.array([p["bytes"] / 1e3 for p in sizes])
            for name in sweep_columns(sizes):
                library = name.split(" ")[0]
                ax.plot(
                    kilobytes,
                    [p.get(name, np.nan) for p in sizes],
                    "--" if "+" in name else "-",
                    marker="o",
                    markersize=3,
                    color=COLORS.get(library),
                    label=_sweep_name(name),
                )
            if info and info.get("l3_bytes"):
                ax.axvline(info["l3_bytes"] / 1e3, color="black", alpha=0.4, linewidth=1)
                ax.text(info["l3_bytes"] / 1e3, ax.get_ylim()[1], " LLC", fontsize=7, va="top")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax.xaxis)
            _plain_log_ticks(ax.yaxis)
            ax.set_xlabel("tensor size, KB (float32 Nx64; log scale)")
            ax.set_ylabel("time per call, ms (median; log scale)")
            ax.set_title("Per-call time against tensor size (solid: forward; dashed: forward + backward)", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
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
                    ax.bar(
                        positions + (k - (2 * len(names) - 1) / 2) * width,
                        values,
                        width,
                        label=_sweep_name(f"{name} @{count}"),
                        alpha=0.55 if count == 1 else 1.0,
                        color=f"C{names.index(name)}",
                    )
                    k += 1
            ax.set_xticks(positions, [describe_label(row["shape"]) for row in threads], fontsize=7, rotation=15)
            ax.set_xlabel("shape and layout (float32)")
            ax.set_ylabel("time per call, ms (median)")
            ax.set_title("Time against thread count (1 and 2)", fontsize=10)
            ax.legend(fontsize=6, ncol=2)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(
            "Batch norm on the CPU: time against tensor size and thread count"
            + (f"\n{machine_text}" if machine_text else ""),
            fontsize=9,
        )
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        charts.append(("time against tensor size and thread count", path))
    return charts
