"""The README's code and commands must work as written."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs_and_is_correct():
    text = README.read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    x, y, dx = namespace["x"], namespace["y"], namespace["dx"]
    assert y.shape == dx.shape == x.shape
    # The example trains with weight 1 and bias 0: each channel is standardised.
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert np.allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-3)
    assert np.allclose(np.moveaxis(namespace["y_nhwc"], -1, 1), y, atol=1e-6)
    assert np.allclose(namespace["y2"], y, atol=1e-5)


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test-command" in ci
    text = README.read_text()
    command = text.split("<!-- ci:test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pytest" in command


def test_demo_command_runs():
    proc = subprocess.run([sys.executable, "-m", "fastbn", "demo", "--shape", "4", "3", "5", "5", "--repeats", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "per-channel output mean ~ bias: True" in proc.stdout
