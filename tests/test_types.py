"""Static types: ``mypy --strict`` is clean on the package and on a user's script that calls every
public function, and the types it gives that script's results are precise (never ``Any``).

One mypy run checks both (about 40 s with a cold cache, which each run starts from: a cache shared
between runs or workers is not safe to write concurrently).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

# One mypy run (a module fixture) serves every test: all of them on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("mypy")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "typing_user_script.py"
REVEALED = re.compile(r'^(?P<path>[^:]+):(?P<line>\d+): note: Revealed type is "(?P<type>.*)"$')


@pytest.fixture(scope="session")  # kept when other modules' tests come between these on the worker
def mypy_run(tmp_path_factory):
    """``(exit status, output lines)`` of mypy with the pyproject configuration on fastbn/ and the script."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    cache = tmp_path_factory.mktemp("mypy_cache")
    args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), "--no-color-output"]
    stdout, stderr, status = mypy_api.run([*args, str(ROOT / "fastbn"), str(SCRIPT)])
    return status, stdout.splitlines() + stderr.splitlines()


def _revealed(lines):
    return [m for m in map(REVEALED.match, lines) if m]


def test_package_and_user_script_are_strict_clean(mypy_run):
    status, lines = mypy_run
    problems = [line for line in lines if ": error:" in line or (": note:" in line and not REVEALED.match(line))]
    assert status == 0 and not problems, "\n".join(lines)


def test_mypy_runs_in_strict_mode():
    """The configuration is strict for every module but the ones listed with their reasons."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True and config["files"] == ["fastbn"]


def test_revealed_types_are_precise(mypy_run):
    _, lines = mypy_run
    revealed = _revealed(lines)
    calls = [n for n, line in enumerate(SCRIPT.read_text().splitlines(), 1) if line.startswith("reveal_type(")]
    assert sorted(int(m["line"]) for m in revealed) == calls, "\n".join(lines)
    vague = [f"line {m['line']}: {m['type']}" for m in revealed if "Any" in m["type"]]
    assert not vague, "\n".join(vague)
