"""``python -m fastbn bench-fused``: the fused forms against the same work done as separate calls.

For each fused or extended variant of :func:`fastbn.forward` /
:func:`fastbn.backward`, time the fused call against the sequence of separate calls a
user would otherwise write, in the same run, interleaved:

==============  ====================================================  ==========================================
variant         fused                                                 separate calls
==============  ====================================================  ==========================================
relu            ``forward(x, activation="relu")``                     ``forward(x)``; ``np.maximum(y, 0, out=y)``
add_relu        ``forward(x, residual=z, activation="relu")``         ``forward(x)``; ``np.add(y, z, out=y)``; ReLU
ghost           ``forward(x, virtual_batch_size=k)``                  ``forward`` per ghost batch, into one array
renorm          ``forward(x, renorm=(rmax, dmax))``                   ``moments``; r, d in NumPy; ``normalize``
relu (bwd)      ``backward(dy, x, w, saved, y=y)``                    ``g = np.where(y > 0, dy, 0)``; ``backward(g)``
add_relu (bwd)  the same, also returning the residual's gradient      the same (the residual's gradient is g)
==============  ====================================================  ==========================================

The in-place NumPy steps are the fastest separate form (no new arrays).  The
bar, for the ReLU and add + ReLU forms: a fused form must beat its separate
calls by at least the memory passes it saves, i.e. ``separate - fused >= saved passes x (time of one tensor pass)``,
where one tensor pass is half an ``np.copyto`` of the tensor into an existing
array, measured in the same run.  The passes each side must move are counted
as in ``python -m fastbn bench`` (see :func:`passes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fastbn.tools import cases, report

VARIANTS = ("relu", "add_relu", "ghost", "renorm")
BACKWARD_VARIANTS = ("relu", "add_relu")
DEFAULT_SHAPES = ("64x64x56x56", "64x56x56x64@-1", "256x256x14x14")
GHOST_BATCH = 16
RENORM = (3.0, 5.0)
# The bar (fused beats separate calls by the passes it saves) is the one for the fused forms of batch norm
# with the ReLU and the residual add; ghost batches and renormalization are timed against their separate
# forms for information.
BAR_VARIANTS = ("relu", "add_relu")

#: What a timed form returns: fastbn's output, or backward's gradients (and the residual's).
Result: TypeAlias = npt.NDArray[Any] | tuple[npt.NDArray[Any], ...]
#: One row of the report, as fused.json stores it.
Row: TypeAlias = dict[str, Any]


def passes(direction: str, variant: str, channel_bytes: int, cache_bytes: int) -> tuple[int, int]:
    """(fused, separate) minimal tensor passes through DRAM.

    As in ``python -m fastbn bench``: when the tensors a batch-norm step reads
    per channel fit in a core's cache (``channel_bytes`` each: x forward; x and
    dy backward, plus the ReLU's output y when fused), batch norm costs 2
    passes forward (read x, write y) and 3 backward (read x and dy, write dx),
    otherwise 3 and 5.  In place, the ReLU costs 2 passes (read, write), the
    add 3, ``np.where`` 3, a copy 2.  Fused, the residual adds one read, the
    ReLU's mask one read per pass over dy, and the residual's gradient one
    write.
    """
    if direction == "forward":
        bn = 2 if channel_bytes <= cache_bytes else 3
        table = {
            "relu": (bn, bn + 2),
            "add_relu": (bn + 1, bn + 3 + 2),
            # separate ghost batches: each slice is its own batch norm, then a copy into place
            "ghost": (bn, bn + 2),
            # separate renorm: moments (1), then normalize (2)
            "renorm": (bn, 3),
        }
        return table[variant]
    separate = 3 + (3 if 2 * channel_bytes <= cache_bytes else 5)
    fused = 4 if 3 * channel_bytes <= cache_bytes else 7  # reads x, dy, y once or twice; writes dx
    return {"relu": (fused, separate), "add_relu": (fused + 1, separate)}[variant]


class _Inputs(cases.Inputs):
    """:class:`fastbn.tools.cases.Inputs` and the residual ``z`` the add + ReLU forms add."""

    z: npt.NDArray[np.float32]


def _inputs(shape: cases.Shape) -> _Inputs:
    data = _Inputs(shape, "float32")
    rng = np.random.default_rng(1)
    data.z = rng.standard_normal(shape.dims, dtype=np.float32)
    return data


def callables(direction: str, variant: str, data: _Inputs) -> dict[str, Callable[[], Result]]:
    """``{"fused": f, "separate": g}``: zero-argument callables doing the same work."""
    import fastbn

    axis = data.shape.axis
    x, dy, w, b, z = data.x, data.dy, data.weight, data.bias, data.z
    eps = cases.EPS
    if direction == "backward":
        residual = z if variant == "add_relu" else None
        y, saved = fastbn.forward(x, w, b, eps=eps, axis=axis, activation="relu", residual=residual)
        _, plain_saved = fastbn.forward(x, w, b, eps=eps, axis=axis)

        def separate() -> Result:
            g = np.where(y > 0, dy, np.float32(0))
            return (*fastbn.backward(g, x, w, plain_saved, axis=axis), g)

        return {"fused": lambda: fastbn.backward(dy, x, w, saved, axis=axis, y=y), "separate": separate}

    if variant == "relu":

        def separate() -> Result:
            out, _ = fastbn.forward(x, w, b, eps=eps, axis=axis)
            relu: npt.NDArray[Any] = np.maximum(out, 0, out=out)
            return relu

        return {
            "fused": lambda: fastbn.forward(x, w, b, eps=eps, axis=axis, activation="relu")[0],
            "separate": separate,
        }
    if variant == "add_relu":

        def separate() -> Result:
            out, _ = fastbn.forward(x, w, b, eps=eps, axis=axis)
            np.add(out, z, out=out)
            relu: npt.NDArray[Any] = np.maximum(out, 0, out=out)
            return relu

        return {
            "fused": lambda: fastbn.forward(x, w, b, eps=eps, axis=axis, activation="relu", residual=z)[0],
            "separate": separate,
        }
    if variant == "ghost":
        k = GHOST_BATCH

        def separate() -> Result:
            out = np.empty_like(x)
            for start in range(0, x.shape[0], k):
                out[start : start + k] = fastbn.forward(x[start : start + k], w, b, eps=eps, axis=axis)[0]
            return out

        return {
            "fused": lambda: fastbn.forward(x, w, b, eps=eps, axis=axis, virtual_batch_size=k)[0],
            "separate": separate,
        }
    if variant == "renorm":
        rmax, dmax = RENORM

        def separate() -> Result:
            running_mean, running_var = data.running_mean, data.running_var
            mean, var = fastbn.moments(x, axis=axis)
            sigma_running = np.sqrt(running_var.astype(np.float64) + eps)
            r = np.clip(np.sqrt(var + eps) / sigma_running, 1 / rmax, rmax)
            d = np.clip((mean - running_mean) / sigma_running, -dmax, dmax)
            return fastbn.normalize(
                x, mean, var, (w * r).astype(np.float32), (d * w + b).astype(np.float32), eps=eps, axis=axis
            )

        def fused() -> Result:
            # running statistics are copied so that every call sees the same ones, as `separate` does
            return fastbn.forward(
                x,
                w,
                b,
                running_mean=data.running_mean.copy(),
                running_var=data.running_var.copy(),
                eps=eps,
                axis=axis,
                renorm=RENORM,
            )[0]

        return {"fused": fused, "separate": separate}
    raise ValueError(variant)


def _check(results: Mapping[str, Result]) -> bool:
    """Both forms agree (float32 tolerances of the core issue, on the outputs' own scale)."""
    fused, separate = results["fused"], results["separate"]
    fused = fused if isinstance(fused, tuple) else (fused,)
    separate = separate if isinstance(separate, tuple) else (separate,)
    for a, b in zip(fused, separate):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(b)) + 1.0
        if not np.allclose(a, b, rtol=1e-4, atol=1e-4 * scale):
            return False
    return True


def run_rows(
    shapes: Iterable[cases.Shape], repeats: int, rounds: int, progress: Callable[[Row], object] | None = None
) -> list[Row]:
    """Time every (direction, variant, shape); return rows of results."""
    from fastbn.backends.cpu.machine import machine

    rows: list[Row] = []
    cache = machine().core_cache_bytes
    for shape in shapes:
        data = _inputs(shape)

        def copy(data: _Inputs = data) -> None:
            np.copyto(data.copy_target, data.x)

        copy_seconds = cases.time_interleaved({"copy": copy}, repeats, rounds)[0]["copy"]
        channel_bytes = cases.channel_bytes(shape, 4)
        work = [("forward", v) for v in VARIANTS] + [("backward", v) for v in BACKWARD_VARIANTS]
        for direction, variant in work:
            if variant == "ghost" and shape.dims[0] % GHOST_BATCH:
                continue
            functions = callables(direction, variant, data)
            agree = _check({name: f() for name, f in functions.items()})
            medians, _ = cases.time_interleaved(functions, repeats, rounds)
            fused_passes, separate_passes = passes(direction, variant, channel_bytes, cache)
            pass_seconds = copy_seconds / 2
            saved = separate_passes - fused_passes
            gain = medians["separate"] - medians["fused"]
            barred = variant in BAR_VARIANTS
            rows.append(
                {
                    "direction": direction,
                    "variant": variant,
                    "shape": shape.label,
                    "mb": data.nbytes / 1e6,
                    "fused_ms": 1e3 * medians["fused"],
                    "separate_ms": 1e3 * medians["separate"],
                    "speedup": medians["separate"] / medians["fused"],
                    "fused_passes": fused_passes,
                    "separate_passes": separate_passes,
                    "pass_ms": 1e3 * pass_seconds,
                    "gain_ms": 1e3 * gain,
                    "needed_ms": 1e3 * saved * pass_seconds,
                    "agree": agree,
                    "bar": (gain >= saved * pass_seconds) if barred else None,
                }
            )
            if progress:
                progress(rows[-1])
    return rows


_FORMS = {
    "relu": "BN + ReLU",
    "add_relu": "BN + add + ReLU",
    "ghost": f"ghost batches of {GHOST_BATCH}",
    "renorm": "batch renormalization",
}


def _form(row: Row) -> str:
    """``forward: BN + add + ReLU``, the row's direction and fused form in words."""
    return f"{row['direction']}: {_FORMS.get(row['variant'], row['variant'])}"


def _bar_cell(bar: bool | None) -> str:
    return "n/a (for information)" if bar is None else ("met" if bar else "**missed**")


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def table(rows: Iterable[Row]) -> str:
    """The main table (7 columns): each fused form's time against its separate calls, and the bar."""
    header = ["fused form", "shape", "fused ms", "separate calls ms", "speed-up", "time saved ms (needed)", "bar"]
    return _markdown(
        header,
        [
            [
                _form(r),
                cases.describe_label(r["shape"]),
                f"{r['fused_ms']:.2f}",
                f"{r['separate_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{r['gain_ms']:.2f} ({r['needed_ms']:.2f})",
                _bar_cell(r["bar"]),
            ]
            for r in rows
        ],
    )


def diagnostics_table(rows: Iterable[Row]) -> str:
    """The second table: size, the passes each side moves, one pass's time, whether both forms agree."""
    header = [
        "fused form",
        "shape",
        "MB",
        "DRAM passes, fused / separate",
        "one pass ms",
        "needed ms (saved passes x one pass)",
        "results agree",
    ]
    return _markdown(
        header,
        [
            [
                _form(r),
                cases.describe_label(r["shape"]),
                f"{r['mb']:.1f}",
                f"{r['fused_passes']} / {r['separate_passes']}",
                f"{r['pass_ms']:.2f}",
                f"{r['needed_ms']:.2f}",
                "yes" if r["agree"] else "**NO**",
            ]
            for r in rows
        ],
    )


def summary(rows: Sequence[Row]) -> str:
    """The bar's outcome and the agreement check, in sentences (never "0 of 0")."""
    barred = [r for r in rows if r["bar"] is not None]
    passed = sum(r["bar"] for r in barred)
    if not barred:
        outcome = "no rows with a bar in this run."
    elif passed == len(barred):
        outcome = f"all {len(barred)} rows meet it."
    else:
        missed = "; ".join(
            f"{_form(r)} {cases.describe_label(r['shape'])} (saves {r['gain_ms']:.2f} ms, needs {r['needed_ms']:.2f})"
            for r in barred
            if not r["bar"]
        )
        outcome = f"{passed} of {len(barred)} rows meet it. Missed: {missed}."
    disagree = [r for r in rows if not r["agree"]]
    agree = (
        "Both forms give the same results on every row."
        if not disagree
        else "**The two forms disagree** on "
        + "; ".join(f"{_form(r)} {cases.describe_label(r['shape'])}" for r in disagree)
        + "."
    )
    return (
        "Bar (time saved ≥ saved passes x one tensor pass; one pass = half an `np.copyto` of the tensor into an "
        "existing array, measured in the same run), for the fused BN + ReLU and BN + add + ReLU: "
        + outcome
        + " Ghost batches and renormalization are timed against their separate forms for information (no bar). "
        + agree
    )


def write_report(
    out_dir: str,
    info: Mapping[str, Any],
    rows: Sequence[Row],
    command: str,
    seconds: float | None = None,
    write_json: bool = True,
) -> str:
    """Write fused.md (and ``write_json``: fused.json) into ``out_dir``; return fused.md's path."""
    took = "" if seconds is None else f" in {seconds:.0f} s"
    text = "\n".join(
        [
            "# fastbn fused forms against separate calls",
            "",
            f"Generated by `{command}` on {info['date']}{took}.",
            "",
            f"Machine: {report.machine_line(info)}",
            "",
            "## Results",
            "",
            "Median ms of each fused call and of the separate calls doing the same work; speed-up = separate / "
            "fused; time saved = separate - fused, with the time the saved memory passes take in parentheses.",
            "",
            table(rows),
            "",
            summary(rows),
            "",
            "## Diagnostics",
            "",
            diagnostics_table(rows),
            "",
            "Medians of interleaved calls after warm-up; float32; every call returns newly allocated outputs "
            "(the separate forms work in place where NumPy allows, their fastest form). See "
            "fastbn/tools/bench_fused.py for exactly what each side runs and how passes are counted.",
            "",
        ]
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fused.md")
    with open(path, "w") as f:
        f.write(text)
    if write_json:
        with open(os.path.join(out_dir, "fused.json"), "w") as f:
            json.dump({"command": command, "machine": info, "seconds": seconds, "rows": rows}, f, indent=1, default=str)
    return path


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``bench-fused`` subcommand to ``python -m fastbn``'s subparsers."""
    parser = commands.add_parser(
        "bench-fused",
        help="time the fused forms against separate calls; write a report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--shapes",
        type=cases.comma_list(cases.parse_shape),
        default=[cases.parse_shape(s) for s in DEFAULT_SHAPES],
        metavar="SHAPE[,SHAPE...]",
        help=f"shapes, as for python -m fastbn bench (default: {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the two forms taking turns (default 3)")
    parser.add_argument(
        "--out",
        default=os.path.join("bench", "results"),
        help="directory for fused.md and fused.json (default bench/results)",
    )
    parser.add_argument(
        "--from-json",
        metavar="FUSED_JSON",
        help="time nothing: re-render fused.md into --out from a fused.json an earlier run wrote",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the fused benchmark; write fused.md and fused.json; return an exit code."""
    if args.rounds < 1 or args.repeats < 1:
        print("python -m fastbn bench-fused: error: --repeats and --rounds must be positive", file=sys.stderr)
        return 2
    if args.from_json:
        try:
            with open(args.from_json) as f:
                saved = json.load(f)
            info, rows, command = saved["machine"], saved["rows"], saved["command"]
        except (OSError, ValueError, KeyError) as exc:
            print(
                f"python -m fastbn bench-fused: error: --from-json {args.from_json}: cannot read a fused.json ({exc})",
                file=sys.stderr,
            )
            return 2
        path = write_report(args.out, info, rows, command, saved.get("seconds"), write_json=False)
        print(f"Wrote {path}")
        return 0
    import fastbn

    fastbn.threading_layer()
    info = report.machine_info()
    start = time.time()
    rows = run_rows(
        args.shapes,
        args.repeats,
        args.rounds,
        progress=lambda r: print(
            f"  {r['direction']:8s} {r['variant']:9s} {r['shape']:16s} "
            f"fused {r['fused_ms']:7.2f} ms  separate {r['separate_ms']:7.2f} ms",
            file=sys.stderr,
        ),
    )
    words = ["python -m fastbn bench-fused"]
    if [s.label for s in args.shapes] != list(DEFAULT_SHAPES):
        words.append("--shapes " + ",".join(s.label for s in args.shapes))
    for name, default in (("repeats", 5), ("rounds", 3)):
        if getattr(args, name) != default:
            words.append(f"--{name} {getattr(args, name)}")
    command = " ".join(words)
    path = write_report(args.out, info, rows, command, time.time() - start)
    print(table(rows))
    print()
    print(summary(rows))
    print(f"\nWrote {path}")
    return 0
