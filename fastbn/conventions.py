"""How each framework's batch-norm conventions map onto fastbn's, as data.

fastbn follows PyTorch.  Keras, Flax and TensorFlow name, default and store
things differently, and mixing them up is a classic porting bug (a Keras
momentum of 0.99 is PyTorch's 0.01; Keras and Flax keep a *biased* moving
variance, PyTorch an unbiased one).  :data:`FRAMEWORKS` states each
convention once: :mod:`fastbn.flax` and :mod:`fastbn.keras` take their
defaults and their momentum mapping from it, ``tests/test_conventions.py``
checks every entry against the installed frameworks themselves, and
:func:`table` renders it for the README (``python -m fastbn conventions``
writes ``docs/conventions.md``, which ``python -m fastbn readme`` splices in).

Examples
--------
>>> from fastbn.conventions import FRAMEWORKS
>>> FRAMEWORKS["keras"].torch_momentum(0.99)  # the fastbn/PyTorch momentum of a Keras layer's 0.99
0.01
>>> FRAMEWORKS["keras"].eps, FRAMEWORKS["flax"].eps
(0.001, 1e-05)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FRAMEWORKS", "Framework", "table"]


@dataclass(frozen=True)
class Framework:
    """One framework's batch-norm conventions.

    Examples
    --------
    >>> FRAMEWORKS["flax"].update, FRAMEWORKS["flax"].unbiased_running_var
    ('new = m·old + (1 - m)·batch', False)

    Attributes
    ----------
    title : str
        The column heading: the framework's own batch norm.
    fastbn : str
        fastbn's drop-in for it.
    momentum : float
        The default momentum (or decay, or averaging factor).
    decay : bool
        Whether the momentum weighs the *old* value (``new = m old + (1 - m)
        batch``, Keras and Flax) rather than the batch (``new = (1 - m) old +
        m batch``, PyTorch and TensorFlow's ``exponential_avg_factor``).
    eps : float
        The default epsilon.
    unbiased_running_var : bool
        Whether the stored running variance is the unbiased (÷ (n - 1)) batch
        variance; the normalisation itself uses the biased one everywhere.
    switch : str
        How training and inference are selected.
    one_value : str
        What training on one value per channel does.
    empty : str
        What an empty batch does.
    half : str
        How float16 input is computed.
    variance : str
        How the variance is computed.
    """

    title: str
    fastbn: str
    momentum: float
    decay: bool
    eps: float
    unbiased_running_var: bool
    switch: str
    one_value: str
    empty: str
    half: str
    variance: str

    def torch_momentum(self, momentum: float) -> float:
        """fastbn's (PyTorch's) momentum for this framework's ``momentum``: ``1 - m`` for a decay.

        Rounded to 12 digits, so that 0.99 maps to 0.01 and not 0.010000000000000009.

        Examples
        --------
        >>> FRAMEWORKS["flax"].torch_momentum(0.9), FRAMEWORKS["tensorflow"].torch_momentum(0.3)
        (0.1, 0.3)
        """
        return round(1.0 - momentum, 12) if self.decay else float(momentum)

    @property
    def update(self) -> str:
        """The running-statistics update, as a formula."""
        return "new = m·old + (1 - m)·batch" if self.decay else "new = (1 - m)·old + m·batch"


FRAMEWORKS: dict[str, Framework] = {
    "pytorch": Framework(
        title="PyTorch `nn.BatchNorm2d`, fastbn",
        fastbn="`fastbn.forward`, `fastbn.torch.BatchNorm2d`",
        momentum=0.1,
        decay=False,
        eps=1e-5,
        unbiased_running_var=True,
        switch="`training=` (modules: `.train()` / `.eval()`)",
        one_value="`ValueError`",
        empty="empty output, running statistics untouched",
        half="float32 statistics and parameters",
        variance="two-pass / Chan merge (fastbn: on pivoted values, float64 sums on the CPU)",
    ),
    "keras": Framework(
        title="Keras 3 `BatchNormalization`",
        fastbn="`fastbn.keras.BatchNormalization`",
        momentum=0.99,
        decay=True,
        eps=1e-3,
        unbiased_running_var=False,
        switch="`training=` call argument (default inference)",
        one_value="no error: output = beta",
        empty="empty output",
        half="statistics in float32",
        variance="`ops.moments`: mean of squared deviations",
    ),
    "flax": Framework(
        title="Flax `linen.BatchNorm`",
        fastbn="`fastbn.flax.BatchNorm`",
        momentum=0.99,
        decay=True,
        eps=1e-5,
        unbiased_running_var=False,
        switch="`use_running_average=`",
        one_value="no error: output = bias",
        empty="NaN statistics",
        half="statistics in float32 (`force_float32_reductions`)",
        variance="E[x²] - E[x]² by default (`use_fast_variance=True`)",
    ),
    "tensorflow": Framework(
        title="TensorFlow `tf.nn.fused_batch_norm`",
        fastbn="`fastbn.forward(..., axis=-1)`, `fastbn.moments(x, axes)`, `fastbn.normalize`",
        momentum=1.0,
        decay=False,
        eps=1e-3,
        unbiased_running_var=True,
        switch="`is_training=`",
        one_value="no error: output = offset",
        empty="empty output, NaN statistics",
        half="float32 statistics",
        variance="two-pass in float32 (`tf.nn.moments`: mean of squared deviations)",
    ),
}


def table() -> str:
    """The conventions as a Markdown table, one column per framework (the README's Semantics table).

    Examples
    --------
    >>> print(table().splitlines()[3])
    | running-statistics update | new = (1 - m)·old + m·batch | new = m·old + (1 - m)·batch | ...
    """
    columns = list(FRAMEWORKS.values())
    rows = [
        ("fastbn's drop-in", [f.fastbn for f in columns]),
        ("running-statistics update", [f.update for f in columns]),
        ("default momentum m", [f"{f.momentum:g}" for f in columns]),
        ("the same in fastbn's `momentum=`", [f"{f.torch_momentum(f.momentum):g}" for f in columns]),
        ("default eps", [f"{f.eps:g}" for f in columns]),
        ("variance used to normalise", ["biased (÷ n)"] * len(columns)),
        (
            "variance stored as the running one",
            ["unbiased (÷ (n - 1))" if f.unbiased_running_var else "biased (÷ n)" for f in columns],
        ),
        ("train/eval switch", [f.switch for f in columns]),
        ("training on 1 value per channel", [f.one_value for f in columns]),
        ("empty batch", [f.empty for f in columns]),
        ("float16 input", [f.half for f in columns]),
        ("variance formula", [f.variance for f in columns]),
    ]
    lines = ["| | " + " | ".join(f.title for f in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"
