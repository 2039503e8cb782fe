"""The documentation: every public docstring's Examples run as doctests, and the Sphinx build is warning-free.

The examples assume ``import numpy as np`` and ``import fastbn`` (as NumPy's own docstrings assume ``np``);
they import torch, JAX and the adapters themselves.  The build is the command docs/conf.py names, into a
temporary directory.
"""

import doctest
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn

ROOT = Path(__file__).resolve().parent.parent

# The modules that define the public names, each with the frameworks it needs.
MODULES = {
    "fastbn._api": None,
    "fastbn._steps": None,
    "fastbn.layer": None,
    "fastbn._sync": None,
    "fastbn.backends.cpu.alloc": None,
    "fastbn.backends.cpu.threads": None,
    "fastbn.torch._functional": "torch",
    "fastbn.torch._modules": "torch",
    "fastbn.jax": "jax",
    "fastbn._jax_stats": "jax",
    "fastbn.torch._stats": "torch",
    "fastbn.flax": "flax",
    "fastbn.keras": "keras",
    "fastbn.conventions": None,
}

# The public packages whose __all__ lists the documented names; exceptions are documented without examples.
PUBLIC = {
    "fastbn": None,
    "fastbn.torch": "torch",
    "fastbn.jax": "jax",
    "fastbn.flax": "flax",
    "fastbn.keras": "keras",
    "fastbn.conventions": None,
}

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _needs(framework):
    if framework is not None and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")


@pytest.mark.parametrize("name", list(MODULES))
def test_docstring_examples_run(name):
    _needs(MODULES[name])
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"np": np, "fastbn": fastbn}, optionflags=FLAGS, report=True)
    assert result.attempted > 0, f"{name}: no doctest examples found"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"


def _public(package):
    module = importlib.import_module(package)
    for attr in module.__all__:
        obj = getattr(module, attr)
        if callable(obj) and not (inspect.isclass(obj) and issubclass(obj, BaseException)):
            yield f"{package}.{attr}", obj


@pytest.mark.parametrize("package", list(PUBLIC))
def test_every_public_callable_has_an_examples_section(package):
    _needs(PUBLIC[package])
    missing = [
        name
        for name, obj in _public(package)
        if not re.search(r"^\s*Examples\n\s*-{8,}\n(?:.*\n)*?\s*>>> ", inspect.getdoc(obj) or "", re.MULTILINE)
    ]
    assert not missing, f"no Examples section with a >>> line: {missing}"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"sphinx failed:\n{run.stdout}\n{run.stderr}"
    assert not run.stderr.strip(), f"sphinx warned:\n{run.stderr}"
    assert (tmp_path / "api.html").is_file()
