"""Run examples/train_mlp.py briefly, as a user would, and check what it writes.

Needs the ``examples`` extra (scikit-learn, matplotlib, tqdm); the breast-cancer
data ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_mlp.py"
# A short run: two learning rates, one repeat, a few epochs (about 10 s on 2 cores).
SHORT = ["--epochs", "4", "--repeats", "1", "--lrs", "0.03,0.3", "--seed", "1"]


def run_example(out, *args, timeout=300):
    env = dict(os.environ)
    # Import the fastbn of this checkout even if it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The module fixture runs once: every test here on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("example")


@pytest.fixture(scope="session")  # kept when other modules' tests come between these on the worker
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_mlp")
    proc = run_example(out, *SHORT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, proc


def test_prints_the_table(short_run):
    _, proc = short_run
    assert "final train loss" in proc.stdout and "test accuracy" in proc.stdout
    for word in ("raw", "standardized", "none", "bn23", "bn_all"):
        assert word in proc.stdout
    # tqdm's bar goes to stderr.
    assert "run" in proc.stderr and "100%" in proc.stderr


def test_writes_png_and_markdown(short_run):
    out, _ = short_run
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "(a) Raw against standardized inputs" in md
    assert "(b) BN layouts over the learning-rate sweep" in md
    assert "| inputs | layout | lr | final train loss | test accuracy % |" in md
    assert md.count("\n| standardized |") == 6  # 3 layouts x 2 learning rates
    assert "loss_curves.png" in md


def test_loss_falls(short_run):
    out, _ = short_run
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    runs = [r for r in data["runs"] if r["inputs"] == "standardized"]
    assert len(runs) == 6
    for run in runs:
        assert not run["diverged"], run
        curve = run["curve"]
        assert len(curve) == 4
        assert curve[-1] < 0.5 * curve[0], run
        assert run["test_acc"] > 0.85, run


def test_deterministic_given_seed(short_run, tmp_path):
    out, _ = short_run
    proc = run_example(tmp_path, *SHORT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results.md").read_bytes() == (out / "results.md").read_bytes()
    first, second = (json.loads((d / "results.json").read_text(encoding="utf-8")) for d in (out, tmp_path))
    first["args"].pop("out")
    second["args"].pop("out")
    assert first == second


def test_rejects_bad_arguments(tmp_path):
    proc = run_example(tmp_path, "--epochs", "0", timeout=120)
    assert proc.returncode == 2 and "--epochs" in proc.stderr
    proc = run_example(tmp_path, "--lrs", "0.1,-1", timeout=120)
    assert proc.returncode == 2 and "--lrs" in proc.stderr
