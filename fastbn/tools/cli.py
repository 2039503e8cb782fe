"""Command line: ``python -m fastbn COMMAND``, COMMAND one of those below.

``demo``
    A forward/backward round trip on an NCHW batch, checked against plain
    NumPy and timed against it.
``startup``
    What the first call costs: import time, first call with an empty kernel
    cache (compilation) and first call with a warm cache, each measured in a
    fresh interpreter.  Prints a Markdown table and writes it to ``--out``
    (default bench/results/startup.md), the README's start-up figures.
``ptx``
    Compile every CUDA kernel for every dtype with the real NVVM compiler
    (no GPU needed) and report registers and spills; see fastbn/tools/ptx.py.
``bench``
    The CPU performance matrix against NumPy, PyTorch and the memory
    roofline; writes the report behind the README (fastbn/tools/bench.py).
``bench-fused``
    The fused forms (ReLU, residual add, ghost batches, renormalization)
    against the same work as separate calls (fastbn/tools/bench_fused.py).
``bench-torch``
    ``fastbn.torch.batch_norm`` against ``torch.nn.functional.batch_norm``,
    small calls (the per-call cost) and large ones (fastbn/tools/bench_torch.py).
``plan``
    The CPU plan chosen for an input, and the machine facts it rests on
    (fastbn/tools/plan.py).
``torch-suite``
    PyTorch's own batch-norm tests (from a PyTorch source checkout), run on
    plain torch and with fastbn swapped in; lists the tests that pass on
    torch but fail on fastbn (fastbn/tools/torch_suite.py).
``readme``
    Splice the committed report fragments into README.md's generated
    sections; ``--check`` only compares (fastbn/tools/readme.py).
``conventions``
    How PyTorch's, Keras's, Flax's and TensorFlow's batch-norm conventions map
    onto fastbn's, as a Markdown table (:mod:`fastbn.conventions`); ``--out``
    writes it (docs/conventions.md, the README's Semantics table).
``precompile``
    Fill the CPU kernels' disk cache ahead of the first call, for the chosen
    dtypes, layouts, operations and fused forms, in parallel processes
    (fastbn/tools/precompile.py).

The command modules are imported when the parser is built, but leave Numba,
PyTorch and numba-cuda until their command runs, so ``python -m fastbn
--help`` is instant and compiles nothing.  A command whose optional
dependency is missing says which extra to install and exits with status 2.

Installing fastbn also installs this command line as ``fastbn`` (the same
:func:`main`); ``--version`` prints fastbn's version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fastbn import __version__
from fastbn._frameworks import MissingDependency
from fastbn.backends.cpu.machine import machine

_Floats: TypeAlias = npt.NDArray[np.floating[Any]]


def _numpy_batch_norm(x: _Floats, weight: _Floats, bias: _Floats, eps: float) -> _Floats:
    """The textbook NCHW training forward, in plain NumPy, for comparison."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    y: _Floats = (x - mean) / np.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]
    return y


def _median_ms(func: Callable[[], object], repeats: int) -> float:
    func()  # warm-up: compilation and first-touch never count
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def demo(args: argparse.Namespace) -> int:
    """Run and time a forward/backward pass; return a process exit code."""
    import fastbn

    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    channels = shape[1]
    x = (rng.standard_normal(shape) * 3 + 10).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    running_mean = np.zeros(channels, np.float32)
    running_var = np.ones(channels, np.float32)

    y, saved = fastbn.forward(x, weight, bias, running_mean=running_mean, running_var=running_var)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dweight, dbias = fastbn.backward(dy, x, weight, saved)

    reference = _numpy_batch_norm(x.astype(np.float64), weight, bias, 1e-5)
    error = float(np.max(np.abs(y - reference)))
    print(f"fastbn {fastbn.__version__}, threading layer {fastbn.threading_layer()}, {machine().cores} CPUs")
    print(f"input {shape} float32 (NCHW), {x.nbytes / 1e6:.1f} MB")
    print(f"forward: max |y - numpy float64| = {error:.2e}")
    print(f"per-channel output mean ~ bias: {np.allclose(y.mean(axis=(0, 2, 3)), bias, atol=1e-4)}")
    print(f"running_mean[:3] = {running_mean[:3]}, running_var[:3] = {running_var[:3]}")
    print(
        f"backward: |dweight| = {np.linalg.norm(dweight):.3f}, |dbias| = {np.linalg.norm(dbias):.3f}, "
        f"per-channel sum of dx ~ 0: {np.allclose(dx.sum(axis=(0, 2, 3)), 0, atol=1e-2)}"
    )
    forward_ms = _median_ms(lambda: fastbn.forward(x, weight, bias), args.repeats)
    backward_ms = _median_ms(lambda: fastbn.backward(dy, x, weight, saved), args.repeats)
    numpy_ms = _median_ms(lambda: _numpy_batch_norm(x, weight, bias, 1e-5), args.repeats)
    print(
        f"median of {args.repeats}: fastbn forward {forward_ms:.2f} ms, backward {backward_ms:.2f} ms; "
        f"NumPy forward {numpy_ms:.2f} ms ({numpy_ms / forward_ms:.1f}x slower)"
    )
    return 0 if error < 1e-3 else 1


_FIRST_CALL = """
import json, time
t0 = time.perf_counter()
import fastbn
t1 = time.perf_counter()
import numpy as np
x = np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32)
t2 = time.perf_counter()
y, saved = fastbn.forward(x)
t3 = time.perf_counter()
fastbn.backward(np.ones_like(x), x, None, saved)
t4 = time.perf_counter()
fastbn.forward(x)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "forward": t3 - t2, "backward": t4 - t3, "again": t5 - t4,
                  "layer": fastbn.threading_layer()}))
"""


def _first_call(cache_dir: str) -> dict[str, Any]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, env=env, check=True)
    times: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return times


def startup(args: argparse.Namespace) -> int:
    """Measure import, cold and warm first-call cost; print a Markdown table and write it to ``args.out``."""
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = _first_call(cache_dir)
        warm = [_first_call(cache_dir) for _ in range(args.repeats)]
    warm_median = {key: float(np.median([w[key] for w in warm])) for key in ("import", "forward", "backward", "again")}
    rows.append(("cold (empty kernel cache: compiles)", cold))
    rows.append((f"warm (kernels cached on disk; median of {args.repeats})", warm_median))
    lines = [
        f"First-call cost, float32 (8, 16, 8, 8) NCHW, threading layer {cold['layer']}, "
        f"{machine().cores} CPUs, Python {sys.version.split()[0]}:",
        "",
        "| run | `import fastbn` | first `forward` | first `backward` | second `forward` |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {1e3 * t['import']:.0f} ms | {1e3 * t['forward']:.0f} ms | "
        f"{1e3 * t['backward']:.0f} ms | {1e3 * t['again']:.2f} ms |"
        for name, t in rows
    ]
    lines += ["", "Measured by `python -m fastbn startup`."]
    print("\n".join(lines))
    if args.out:  # the README's fragment (python -m fastbn readme splices it in)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        print(f"\nWrote {args.out}")
    return 0


def conventions(args: argparse.Namespace) -> int:
    """Print the conventions table (:func:`fastbn.conventions.table`), or write it to ``--out``."""
    from fastbn.conventions import table

    text = table()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"Wrote {args.out}")
    else:
        print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fastbn`` and of the ``fastbn`` command; returns the process exit code."""
    from fastbn.tools import bench, bench_fused, bench_torch, gpu_check, plan, precompile, ptx, readme, torch_suite

    # Named as it was started: the ``fastbn`` console script or ``python -m fastbn``.
    prog = "fastbn" if os.path.basename(sys.argv[0]) == "fastbn" else "python -m fastbn"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastbn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="forward/backward demo, checked and timed against NumPy")
    demo_parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 28, 28], metavar=("N", "C", "H", "W"))
    demo_parser.add_argument("--repeats", type=int, default=10)
    startup_parser = commands.add_parser("startup", help="measure import, cold and warm first-call cost")
    startup_parser.add_argument("--repeats", type=int, default=3)
    startup_parser.add_argument(
        "--out",
        default=os.path.join("bench", "results", "startup.md"),
        help="also write the table here (default bench/results/startup.md; '' for none)",
    )
    for module in (ptx, bench, bench_fused, bench_torch, plan, torch_suite):
        module.add_parser(commands)
    runs: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": demo,
        "startup": startup,
        "ptx": ptx.run,
        "bench": bench.run,
        "bench-fused": bench_fused.run,
        "bench-torch": bench_torch.run,
        "plan": plan.run,
        "torch-suite": torch_suite.run,
    }
    readme.add_parser(commands)
    runs["readme"] = readme.run
    conventions_parser = commands.add_parser("conventions", help="how each framework's conventions map onto fastbn's")
    conventions_parser.add_argument("--out", help="write the Markdown table here (docs/conventions.md for the README)")
    runs["conventions"] = conventions
    precompile.add_parser(commands)
    runs["precompile"] = precompile.run
    gpu_check.add_parser(commands)
    runs["gpu-check"] = gpu_check.run
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats: expected a positive integer")
    try:
        return runs[args.command](args)
    except MissingDependency as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
