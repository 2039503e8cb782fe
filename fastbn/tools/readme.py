"""``python -m fastbn readme [--check]``: the README's measured figures, spliced from the committed reports.

Every figure in README.md that a command measures lives between a pair of
markers, ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``, and
is a verbatim copy of a committed fragment file that the measuring command
writes.  Edit the command or rerun it, never the README between markers:

============  ==================================  ================================================
NAME          fragment                            written by
============  ==================================  ================================================
bench         bench/results/README_snippet.md     ``python -m fastbn bench --out bench/results``
startup       bench/results/startup.md            ``python -m fastbn startup``
bench-torch   bench/results/bench_torch.md        ``python -m fastbn bench-torch``
suite         docs/test_suite.md                  ``FASTBN_SUITE_REPORT=docs/test_suite.md bash .ci/run``
                                                  (the README's test command; tests/conftest.py)
mlp           docs/train_mlp_results.md           ``python examples/train_mlp.py --summary
                                                  docs/train_mlp_results.md``
conventions   docs/conventions.md                 ``python -m fastbn conventions --out
                                                  docs/conventions.md``
============  ==================================  ================================================

``python -m fastbn readme`` rewrites each marked section from its fragment;
``--check`` changes nothing and exits with status 1, naming the sections,
when the README and the fragments disagree (tests/test_readme.py runs it).
A new generated section is one more entry in :data:`FRAGMENTS` and one more
pair of markers in the README.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = ["FRAGMENTS", "Fragment", "add_parser", "check", "run", "splice"]


class Fragment(NamedTuple):
    """A generated README section: its fragment file (relative to the README) and the command writing it."""

    path: str
    command: str


#: The README's generated sections, by marker name.
FRAGMENTS = {
    "bench": Fragment("bench/results/README_snippet.md", "python -m fastbn bench --out bench/results"),
    "startup": Fragment("bench/results/startup.md", "python -m fastbn startup"),
    "bench-torch": Fragment("bench/results/bench_torch.md", "python -m fastbn bench-torch"),
    "suite": Fragment("docs/test_suite.md", "FASTBN_SUITE_REPORT=docs/test_suite.md bash .ci/run"),
    "torch-suite": Fragment(
        "docs/torch_suite.md",
        "python -m fastbn torch-suite --pytorch-src DIR --out docs/torch_suite_report.txt "
        "--summary docs/torch_suite.md",
    ),
    "mlp": Fragment("docs/train_mlp_results.md", "python examples/train_mlp.py --summary docs/train_mlp_results.md"),
    "conventions": Fragment("docs/conventions.md", "python -m fastbn conventions --out docs/conventions.md"),
}

_SECTION = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _body(fragment_text: str) -> str:
    """What goes between the markers: the fragment, set off by blank lines so that Markdown parses it alone."""
    return "\n" + fragment_text.strip("\n") + "\n\n"


def splice(readme_text: str, fragments: Mapping[str, str | None]) -> tuple[str, list[str], list[str]]:
    """Return ``(new_text, changed, missing)``: ``readme_text`` with every marked section set to its fragment.

    ``fragments`` maps marker names to the fragments' text, or to None to
    leave that section as it is.  ``changed`` lists the sections whose text
    differed; ``missing`` the names of ``fragments`` that have no markers in
    the README.  A marker whose name is not in ``fragments``, or a name marked
    twice, is a ValueError.
    """
    changed: list[str] = []
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in fragments:
            raise ValueError(f"README: unknown generated section {name!r} (known: {', '.join(fragments)})")
        if name in seen:
            raise ValueError(f"README: generated section {name!r} appears twice")
        seen.add(name)
        fragment = fragments[name]
        if fragment is None:
            return match.group(0)
        body = _body(fragment)
        if match.group("body") != body:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    new_text = _SECTION.sub(replace, readme_text)
    return new_text, changed, [name for name in fragments if name not in seen]


def _load(readme_path: str, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    root = os.path.dirname(os.path.abspath(readme_path))
    texts: dict[str, str] = {}
    absent: list[str] = []
    for name in names:
        path = os.path.join(root, FRAGMENTS[name].path)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                texts[name] = handle.read()
        else:
            absent.append(name)
    return texts, absent


def check(readme_path: str = "README.md") -> list[str]:
    """The problems that ``--check`` reports, as lines; empty when the README matches its fragments."""
    with open(readme_path, encoding="utf-8") as handle:
        text = handle.read()
    texts, absent = _load(readme_path, FRAGMENTS)
    problems = [f"{name}: no fragment {FRAGMENTS[name].path} (run `{FRAGMENTS[name].command}`)" for name in absent]
    _, changed, missing = splice(text, dict(texts, **dict.fromkeys(absent)))
    problems += [
        f"{name}: no <!-- generated:{name} --> ... <!-- /generated:{name} --> markers in {readme_path}"
        for name in missing
    ]
    problems += [
        f"{name}: README differs from {FRAGMENTS[name].path} (run `python -m fastbn readme`)" for name in changed
    ]
    return problems


def run(args: argparse.Namespace) -> int:
    """Splice the fragments into the README, or with ``--check`` only compare; return an exit code."""
    try:
        return _run(args)
    except (OSError, ValueError) as exc:
        print(f"{args.readme}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.check:
        problems = check(args.readme)
        for line in problems:
            print(f"{args.readme}: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.readme}: every generated section matches its fragment ({', '.join(FRAGMENTS)})")
        return 1 if problems else 0
    with open(args.readme, encoding="utf-8") as handle:
        text = handle.read()
    texts, absent = _load(args.readme, FRAGMENTS)
    for name in absent:
        print(
            f"{args.readme}: {name}: no fragment {FRAGMENTS[name].path}, left as it is "
            f"(run `{FRAGMENTS[name].command}`)",
            file=sys.stderr,
        )
    new_text, changed, missing = splice(text, dict(texts, **dict.fromkeys(absent)))
    for name in missing:
        print(f"{args.readme}: {name}: no markers, nothing spliced", file=sys.stderr)
    if changed:
        with open(args.readme, "w", encoding="utf-8") as handle:
            handle.write(new_text)
    print(f"{args.readme}: updated {', '.join(changed)}" if changed else f"{args.readme}: up to date")
    return 1 if absent or missing else 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``readme`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "readme",
        help="splice the committed report fragments into README.md's generated sections (--check: only compare)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit with status 1 if a generated section differs from its fragment",
    )
    parser.add_argument(
        "--readme",
        default="README.md",
        help="the README (default README.md); fragment paths are relative to its folder",
    )
