"""Sphinx configuration: the API reference from fastbn's numpydoc docstrings.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Importing fastbn compiles nothing; fastbn.torch and fastbn.jax are imported
only if torch and JAX are installed, and mocked otherwise.
"""

import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# fastbn.keras imports keras, which imports its backend: JAX, quietly (TensorFlow logs to stderr at import).
# Forced, not defaulted: a test worker that imported Keras on TensorFlow may pass its environment on.
os.environ["KERAS_BACKEND"] = "jax"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import fastbn

project = "fastbn"
author = "the fastbn authors"
copyright = "the fastbn authors"
release = version = fastbn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "numpydoc"]

# Optional frameworks: documented from their docstrings even where they are not installed.
autodoc_mock_imports = [name for name in ("torch", "jax", "flax", "keras") if importlib.util.find_spec(name) is None]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc's Parameters sections already give the types

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

exclude_patterns = ["_build", "train_mlp_results.md"]
html_theme = "alabaster"
html_static_path = []
html_title = f"fastbn {release}"
