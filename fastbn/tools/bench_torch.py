"""``python -m fastbn bench-torch``: fastbn through torch's API against torch's own batch norm.

Each row times one call of ``fastbn.torch.batch_norm`` and of
``torch.nn.functional.batch_norm`` on the same tensors, in the same run:
the median over rounds of the mean time of a batch of calls, after warm-up
(compilation never counts).  Small shapes measure what a call costs beyond
its kernels (argument checks, the autograd node, dispatch); large ones the
kernels.  ``fastbn`` is whichever is importable, so the same file run with
an older checkout on ``PYTHONPATH`` gives the before/after comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from fastbn._frameworks import missing_dependency

if TYPE_CHECKING:
    import torch

__all__ = ["add_parser", "run"]

#: name, shape, dtype, memory format, training, backward
_Case: TypeAlias = tuple[str, tuple[int, ...], str, str, bool, bool]

CASES: list[_Case] = [
    # name, shape, dtype, memory format, training, backward
    ("forward, training", (32, 64), "float32", "contiguous", True, False),
    ("forward+backward, training", (32, 64), "float32", "contiguous", True, True),
    ("forward, training", (32, 64, 28, 28), "float32", "contiguous", True, False),
    ("forward, training", (32, 64, 28, 28), "float32", "channels_last", True, False),
    ("forward, eval", (32, 64, 28, 28), "float32", "contiguous", False, False),
    ("forward+backward, training", (32, 64, 28, 28), "float32", "contiguous", True, True),
    ("forward, training", (32, 64, 28, 28), "bfloat16", "channels_last", True, False),
]


def _time(call: Callable[[], object], rounds: int, seconds: float) -> float:
    call()
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    batch = max(1, int(seconds / rounds / once))
    means: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            call()
        means.append((time.perf_counter() - start) / batch)
    return statistics.median(means)


def _callables(case: _Case) -> tuple[Callable[[], None], Callable[[], None]]:
    import torch
    import torch.nn.functional as F

    import fastbn.torch as fbt

    _, shape, dtype, memory_format, training, backward = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(getattr(torch, dtype))
    if memory_format == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    x.requires_grad_(backward)
    weight.requires_grad_(backward)
    dy = torch.randn_like(x)

    def make(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        running_mean, running_var = torch.zeros(channels), torch.ones(channels)

        def call() -> None:
            y = fn(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
            if backward:
                torch.autograd.grad(y, (x, weight), dy)

        return call

    return make(fbt.batch_norm), make(F.batch_norm)


def run(args: argparse.Namespace) -> int:
    """Time every case; print a Markdown table (and write it to ``--out``)."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise missing_dependency("the bench-torch command", "PyTorch", "torch", exc) from exc

    import fastbn

    torch.set_num_threads(args.threads or torch.get_num_threads())
    print(f"fastbn {fastbn.__version__} from {os.path.dirname(fastbn.__file__)}")
    lines = [
        f"fastbn.torch {fastbn.__version__} against torch.nn.functional.batch_norm (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads) on {_machine()}; per call, the median of {args.rounds} rounds.",
        "",
        "| call | shape | dtype | layout | fastbn.torch us | torch us | torch / fastbn |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        name, shape, dtype, memory_format = case[:4]
        ours, theirs = _callables(case)
        try:
            ours_s = _time(ours, args.rounds, args.seconds)
        except (TypeError, ValueError, RuntimeError) as error:  # an older fastbn refusing bfloat16
            ours_s = None
            print(f"{name} {shape} {dtype}: fastbn refused: {str(error).splitlines()[0]}")
        theirs_s = _time(theirs, args.rounds, args.seconds)
        ours_text = "refused" if ours_s is None else f"{1e6 * ours_s:.1f}"
        ratio = "-" if ours_s is None else f"{theirs_s / ours_s:.2f}x"
        lines.append(f"| {name} | {shape} | {dtype} | {memory_format} | {ours_text} | {1e6 * theirs_s:.1f} | {ratio} |")
    lines += ["", _floor(args), "", "Measured by `python -m fastbn bench-torch`."]
    text = "\n".join(lines)
    print(text)
    if args.out:  # the README's fragment (python -m fastbn readme splices it in)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        print(f"\nWrote {args.out}")
    return 0


def _floor(args: argparse.Namespace) -> str:
    """What a (32, 64) forward+backward defined in Python pays before its glue code.

    torch's own batch norm is a C++ autograd node; any op whose gradient is
    Python code (an ``autograd.Function``, or a custom operator's registered
    autograd) pays for a Python node in forward and backward however fast
    its kernels are.  This times such a node that computes nothing, called
    as the table's rows are, and fastbn's own kernels at the same size
    through the NumPy API (``fastbn.forward`` plus ``fastbn.backward``, their
    own checks included): what ``fastbn.torch`` spends beyond their sum is
    its glue (tensor views, the lane's checks, a node with more inputs).
    """
    import numpy as np
    import torch

    import fastbn

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((32, 64), generator=generator, requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    bias = torch.zeros(64, requires_grad=True)
    dy = torch.randn_like(x)

    class NoOp(torch.autograd.Function):
        """Computes nothing: its outputs are uninitialised."""

        @staticmethod
        def forward(ctx, x, weight, bias):  # type: ignore[no-untyped-def]  # torch calls it
            ctx.save_for_backward(x, weight)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            x, weight = ctx.saved_tensors
            return torch.empty_like(x), torch.empty_like(weight), None

    def node() -> None:
        torch.autograd.grad(NoOp.apply(x, weight, bias), (x, weight), dy)  # type: ignore[no-untyped-call]

    xs, ws, bs, dys = (t.detach().numpy() for t in (x, weight, bias, dy))
    mean, var = np.zeros(64, np.float32), np.ones(64, np.float32)

    def kernels() -> None:
        _y, saved = fastbn.forward(xs, ws, bs, running_mean=mean, running_var=var, training=True)
        fastbn.backward(dys, xs, ws, saved)

    node_s = _time(node, args.rounds, args.seconds)
    kernels_s = _time(kernels, args.rounds, args.seconds)
    return (
        f"Floor of a forward+backward defined in Python, (32, 64) float32: a no-op `torch.autograd.Function` "
        f"costs {1e6 * node_s:.1f} us, fastbn's kernels through the NumPy API {1e6 * kernels_s:.1f} us; "
        f"together {1e6 * (node_s + kernels_s):.1f} us, what `fastbn.torch` costs there before its glue "
        "(torch's own batch norm is a C++ autograd node)."
    )


def _machine() -> str:
    """The CPU as the plan sees it (model, cores, caches); the platform's name from a fastbn that lacks it."""
    try:
        from fastbn.backends.cpu.machine import machine
    except ImportError:  # an older checkout on PYTHONPATH
        import platform

        return platform.processor() or platform.machine()
    return machine().describe()


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench-torch`` on the CLI's subcommands."""
    parser = commands.add_parser("bench-torch", help="fastbn.torch against torch's batch norm, small and large calls")
    _arguments(parser)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.5, help="time budget per row and library")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--out",
        default=os.path.join("bench", "results", "bench_torch.md"),
        help="also write the table here (default bench/results/bench_torch.md, the README's; '' for none)",
    )


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
