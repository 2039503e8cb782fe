#!/usr/bin/env python
"""Test the claims of "Introduction to batch normalization" with a pure-NumPy MLP.

The article makes two claims, and this script measures both on scikit-learn's
breast-cancer data (569 samples, 30 features whose scales run from about
1e-3 to 4e3; it ships inside scikit-learn, nothing is downloaded):

(a) Inputs whose features have very different scales train badly; standardizing
    them (subtract the mean, divide by the standard deviation) helps.
(b) Batch normalization between hidden layers lets a deeper network train at
    larger learning rates and generalise better.

Every combination of inputs (raw, standardized), BN layout and learning rate
is trained with the same initial weights and the same batch order, so runs
differ only in what is being compared.  The BN layouts are:

* ``none``: no batch normalization;
* ``bn23``: one :class:`fastbn.layer.BatchNorm` between hidden layers 2 and 3,
  the article's layout;
* ``bn_all``: a BatchNorm after every hidden layer.

As in the article, BN normalizes a hidden layer's *activations* (after its
ReLU) before they reach the next layer.  (Ioffe and Szegedy's paper puts it
before the nonlinearity instead.)

The network is dense (30 -> 32 -> 32 -> 32 -> 2) with ReLU, trained with
softmax cross-entropy and plain minibatch SGD; everything except the batch
normalization is NumPy.  The script prints a table of final training loss and
test accuracy, and writes to ``--out``:

* ``loss_curves.png``: training loss per epoch for every run;
* ``results.md``: the tables and findings as Markdown, to quote;
* ``results.json``: every number, including the curves;
* ``summary.md`` (or ``--summary PATH``): one row per inputs and layout, the
  README's table (``--summary docs/train_mlp_results.md`` refreshes the
  fragment that ``python -m fastbn readme`` splices into README.md).

Usage::

    python examples/train_mlp.py                      # defaults: < 1 minute on 2 cores
    python examples/train_mlp.py --epochs 60 --seed 3 --out out/mlp

Results are deterministic for a given ``--seed`` on a given machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from fastbn.layer import BatchNorm

INPUTS = ("raw", "standardized")
LAYOUTS = ("none", "bn23", "bn_all")
LAYOUT_LABELS = {
    "none": "no BN",
    "bn23": "BN between hidden 2 and 3",
    "bn_all": "BN after every hidden layer",
}
N_HIDDEN = 3
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# The network's dtype: float32, the precision fastbn is built for.
DTYPE = np.float32


# ------------------------------------------------------------------ layers ---
class Dense:
    """Fully connected layer ``y = x @ W + b`` with He-normal initial weights.

    Parameters
    ----------
    n_in, n_out : int
        Input and output widths.
    rng : numpy.random.Generator
        Source of the initial weights.
    """

    def __init__(self, n_in, n_out, rng):
        # He initialisation keeps the activations' scale through ReLU layers,
        # so that "no BN" is a fair baseline rather than a badly initialised one.
        self.W = (rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, dtype=DTYPE)
        self.dW = None
        self.db = None
        self._x = None

    def __call__(self, x):
        self._x = x
        return x @ self.W + self.b

    def backward(self, dy):
        self.dW = self._x.T @ dy
        self.db = dy.sum(axis=0)
        return dy @ self.W.T

    def parameters(self):
        return [self.W, self.b]

    def gradients(self):
        return [self.dW, self.db]


class ReLU:
    """Rectified linear unit."""

    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask

    def parameters(self):
        return []

    def gradients(self):
        return []


class MLP:
    """Dense/ReLU network with BatchNorm on the chosen hidden activations.

    Parameters
    ----------
    n_in, hidden, n_out : int
        Input width, hidden width (all hidden layers), number of classes.
    bn_after : set of int
        1-based hidden layers whose activations are batch-normalized.
    rng : numpy.random.Generator
        Source of the initial weights.
    """

    def __init__(self, n_in, hidden, n_out, bn_after, rng):
        self.layers = []
        width = n_in
        for k in range(1, N_HIDDEN + 1):
            self.layers += [Dense(width, hidden, rng), ReLU()]
            if k in bn_after:
                self.layers.append(BatchNorm(hidden, dtype=DTYPE))
            width = hidden
        self.layers.append(Dense(width, n_out, rng))

    def train(self, mode=True):
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                layer.train(mode)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)

    def sgd_step(self, lr):
        # parameters() and gradients() are paired lists; the update is in place.
        for layer in self.layers:
            for p, g in zip(layer.parameters(), layer.gradients()):
                p -= lr * g


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) and its gradient with respect to the logits."""
    # Shifting by the row maximum keeps exp() finite for any finite logits.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    n = len(labels)
    loss = float(np.mean(log_sum - shifted[np.arange(n), labels]))
    grad = np.exp(shifted - log_sum[:, None])
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


# -------------------------------------------------------------------- data ---
def load_data(seed):
    """Breast-cancer data, split 75/25 (stratified), raw and standardized.

    The standardization uses the training split's mean and standard deviation
    only, so no test information leaks into training.
    """
    try:
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "examples/train_mlp.py needs scikit-learn: pip install 'fastbn[examples]'", name=exc.name
        ) from exc

    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    data = {
        "raw": (X_train, X_test),
        "standardized": ((X_train - mean) / std, (X_test - mean) / std),
    }
    data = {k: (a.astype(DTYPE), b.astype(DTYPE)) for k, (a, b) in data.items()}
    scales = np.abs(X_train).mean(axis=0)
    return data, y_train, y_test, scales


# ---------------------------------------------------------------- training ---
def train_one(X_train, y_train, X_test, y_test, *, layout, lr, epochs, batch_size, hidden, seed):
    """Train one network; return its per-epoch loss curve and test accuracy.

    ``seed`` alone fixes the initial weights and the batch order, so every
    layout and learning rate sees the same ones.  A run whose loss stops being
    finite is stopped and reported as diverged.
    """
    init_rng = np.random.default_rng([seed, 0])
    order_rng = np.random.default_rng([seed, 1])
    bn_after = {"none": set(), "bn23": {2}, "bn_all": set(range(1, N_HIDDEN + 1))}[layout]
    n_classes = int(y_train.max()) + 1
    model = MLP(X_train.shape[1], hidden, n_classes, bn_after, init_rng)

    n = len(X_train)
    # Near-equal batches instead of a short last one: a batch of one sample
    # would make batch normalization fail, as it does in PyTorch.
    n_batches = max(1, round(n / batch_size))
    curve = []
    diverged = False
    # Overflow is an expected outcome here (raw inputs, large learning rates):
    # it is detected below and reported, not warned about.
    with np.errstate(all="ignore"):
        for _ in range(epochs):
            model.train(True)
            losses = []
            for idx in np.array_split(order_rng.permutation(n), n_batches):
                loss, dlogits = softmax_cross_entropy(model.forward(X_train[idx]), y_train[idx])
                if not math.isfinite(loss):
                    diverged = True
                    break
                losses.append(loss)
                model.backward(dlogits)
                model.sgd_step(lr)
            if diverged:
                break
            curve.append(float(np.mean(losses)))
        # The last step can overflow the weights after a finite loss.
        params = [p for layer in model.layers for p in layer.parameters()]
        diverged = diverged or not all(np.isfinite(p).all() for p in params)
        test_acc = single_class = None
        if not diverged:
            model.train(False)
            pred = model.forward(X_test).argmax(axis=1)
            test_acc = float(np.mean(pred == y_test))
            # A network that has collapsed to one class scores the majority
            # share without having learned anything: worth telling apart.
            single_class = bool(np.unique(pred).size == 1)
    return {
        "curve": curve,
        "final_loss": curve[-1] if curve and not diverged else None,
        "test_acc": test_acc,
        "diverged": diverged,
        "single_class": single_class,
    }


# ----------------------------------------------------------------- reports ---
def summarise(runs, key):
    """Mean and standard deviation of ``key`` over the non-diverged repeats, and the diverged count."""
    values = [r[key] for r in runs if not r["diverged"]]
    n_div = sum(r["diverged"] for r in runs)
    if not values:
        return None, None, n_div
    return float(np.mean(values)), float(np.std(values)), n_div


def fmt_cell(mean, std, n_div, n_rep, *, percent=False, digits=3):
    if mean is None:
        return "diverged"
    scale = 100.0 if percent else 1.0
    text = f"{mean * scale:.{1 if percent else digits}f}"
    if n_rep > 1:
        text += f" ± {std * scale:.{1 if percent else digits}f}"
    if n_div:
        text += f" ({n_div}/{n_rep} div.)"
    return text


def build_table(results, lrs, n_rep):
    """Rows of the full table: inputs, layout, lr, final training loss, test accuracy."""
    rows = []
    for inputs in INPUTS:
        for layout in LAYOUTS:
            for lr in lrs:
                runs = results[(inputs, layout, lr)]
                loss = fmt_cell(*summarise(runs, "final_loss"), n_rep, digits=4)
                acc = fmt_cell(*summarise(runs, "test_acc"), n_rep, percent=True)
                rows.append((inputs, layout, f"{lr:g}", loss, acc))
    return rows


def text_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def best_over_lrs(results, inputs, layout, lrs):
    """(lr, mean test acc, mean final loss) with the best mean test accuracy among fully converged lrs."""
    best = None
    for lr in lrs:
        runs = results[(inputs, layout, lr)]
        if any(r["diverged"] for r in runs):
            continue
        acc = float(np.mean([r["test_acc"] for r in runs]))
        loss = float(np.mean([r["final_loss"] for r in runs]))
        # Ties (common on 143 test samples) go to the lower training loss.
        if best is None or (acc, -loss) > (best[1], -best[2]):
            best = (lr, acc, loss)
    return best


def findings(results, lrs, y_test):
    """Plain statements computed from the measurements; nothing here is hand-written per run."""
    n_test = len(y_test)
    one = 1.0 / n_test  # one test sample, the resolution of the accuracy
    majority = float(np.bincount(y_test).max() / n_test)
    lines = []

    def pct(v):
        return f"{100 * v:.1f}%"

    def n_div_lrs(inputs, layout):
        return sum(any(r["diverged"] for r in results[(inputs, layout, lr)]) for lr in lrs)

    def n_single_lrs(inputs, layout):
        return sum(any(r["single_class"] for r in results[(inputs, layout, lr)]) for lr in lrs)

    def failures(inputs, layout):
        n_div, n_single = n_div_lrs(inputs, layout), n_single_lrs(inputs, layout)
        if not n_div and not n_single:
            return "no run diverged or collapsed to a single class"
        parts = []
        if n_div:
            parts.append(f"a run diverged at {n_div}/{len(lrs)} learning rates")
        if n_single:
            parts.append(
                f"a run predicted one class for every test sample at {n_single}/{len(lrs)} "
                f"(scoring the majority share, {pct(majority)})"
            )
        return " and ".join(parts)

    def best_text(inputs, layout):
        b = best_over_lrs(results, inputs, layout, lrs)
        if b is None:
            return "diverged at every learning rate"
        return f"{pct(b[1])} at lr {b[0]:g} (final training loss {b[2]:.4f})"

    # (a) raw against standardized inputs.
    lines.append("**(a) Raw against standardized inputs** (best mean test accuracy over the learning rates):")
    lines.append("")
    for layout in LAYOUTS:
        lines.append(
            f"- {LAYOUT_LABELS[layout]}: raw inputs {best_text('raw', layout)}; {failures('raw', layout)}. "
            f"Standardized inputs {best_text('standardized', layout)}; {failures('standardized', layout)}."
        )
    b_raw = best_over_lrs(results, "raw", "none", lrs)
    b_std = best_over_lrs(results, "standardized", "none", lrs)
    if b_std is not None and (b_raw is None or b_std[1] > b_raw[1] + one):
        lines.append(
            "- Without BN, standardizing the inputs improved the best test accuracy: the article's point holds here."
        )
    else:
        lines.append(
            "- Without BN, standardizing the inputs did *not* improve the best test accuracy by more than one "
            "test sample here."
        )
    lines.append("")

    # (b) the learning-rate sweep, on standardized inputs.
    lines.append(
        "**(b) BN layouts over the learning-rate sweep** (standardized inputs; "
        f"differences under one test sample, {pct(one)}, count as ties):"
    )
    lines.append("")

    def stable_max(layout):
        ok = [lr for lr in lrs if not any(r["diverged"] for r in results[("standardized", layout, lr)])]
        return max(ok) if ok else None

    base_max = stable_max("none")
    for layout in ("bn23", "bn_all"):
        better_acc, worse_acc, lower_loss = [], [], []
        for lr in lrs:
            base, bn = results[("standardized", "none", lr)], results[("standardized", layout, lr)]
            base_acc, _, _ = summarise(base, "test_acc")
            bn_acc, _, _ = summarise(bn, "test_acc")
            base_loss, _, base_div = summarise(base, "final_loss")
            bn_loss, _, bn_div = summarise(bn, "final_loss")
            # A diverged run loses to a finished one; two diverged runs tie.
            if bn_div < base_div or (bn_div == base_div and base_loss is not None and bn_loss < base_loss):
                lower_loss.append(lr)
            if bn_acc is not None and (base_acc is None or bn_acc > base_acc + one):
                better_acc.append(lr)
            elif base_acc is not None and (bn_acc is None or bn_acc < base_acc - one):
                worse_acc.append(lr)

        def fmt(xs):
            return ", ".join(f"{x:g}" for x in xs) if xs else "none"

        lines.append(
            f"- {LAYOUT_LABELS[layout]} against no BN: lower final training loss at "
            f"{len(lower_loss)}/{len(lrs)} learning rates; higher test accuracy at lr {fmt(better_acc)}; "
            f"lower test accuracy at lr {fmt(worse_acc)}; ties elsewhere."
        )
        bn_max = stable_max(layout)
        if base_max is not None and bn_max is not None:
            if bn_max > base_max:
                verdict = "so BN extended the range of learning rates that train"
            elif bn_max == base_max:
                verdict = "so on this grid BN did not extend the range of learning rates that train"
            else:
                verdict = "so BN *narrowed* the range of learning rates that train"
            top = " (the top of the grid)" if bn_max == max(lrs) else ""
            lines.append(
                f"  Largest learning rate at which no run diverged: {bn_max:g}{top} with BN, "
                f"{base_max:g} without, {verdict}."
            )
    best = {layout: best_over_lrs(results, "standardized", layout, lrs) for layout in LAYOUTS}
    lines.append(
        "- Best test accuracy over the sweep: "
        + "; ".join(f"{LAYOUT_LABELS[k]} {best_text('standardized', k)}" for k in LAYOUTS)
        + "."
    )
    if best["none"] is not None and all(
        best[k] is not None and best[k][1] <= best["none"][1] + one for k in ("bn23", "bn_all")
    ):
        lines.append(
            "- With the learning rate tuned, BN did **not** improve test accuracy on this small, "
            "easy dataset: every layout is within one test sample of no BN, or below it."
        )
    else:
        lines.append("- With the learning rate tuned, BN improved the best test accuracy by more than one test sample.")
    return lines


SUMMARY_LABELS = {"none": "no BN", "bn23": "BN 2-3", "bn_all": "BN after every layer"}


def summary(results, lrs, y_test, n_rep, reproduce):
    """The README's table, as Markdown: per inputs and layout, the best learning rate and the failures."""
    majority = float(np.bincount(y_test).max() / len(y_test))

    def lrs_where(inputs, layout, key):
        hit = [lr for lr in lrs if any(r[key] for r in results[(inputs, layout, lr)])]
        if not hit:
            return "0"
        listed = f" (lr {', '.join(f'{lr:g}' for lr in hit)})" if len(hit) <= 3 else ""
        return f"{len(hit)} of {len(lrs)}{listed}"

    rows = []
    for inputs in INPUTS:
        for layout in LAYOUTS:
            best = best_over_lrs(results, inputs, layout, lrs)
            best_text = "diverged at every lr" if best is None else f"{100 * best[1]:.1f}% ({best[0]:g})"
            rows.append(
                (
                    inputs,
                    SUMMARY_LABELS[layout],
                    best_text,
                    lrs_where(inputs, layout, "diverged"),
                    lrs_where(inputs, layout, "single_class"),
                )
            )
    header = (
        "inputs",
        "layout",
        "best test accuracy (lr)",
        "lrs with a diverged run",
        "lrs where a run predicted one class",
    )
    caption = (
        f"Measured by `{reproduce}`: mean over {n_rep} runs per setting; test accuracy in eval mode on "
        f"{len(y_test)} test samples, of which the majority class is {100 * majority:.1f}% (what a network "
        "predicting one class scores); the best learning rate among those where no run diverged."
    )
    return caption + "\n\n" + md_table(header, rows) + "\n"


# Losses above this are off the charts' scale: a two-class cross-entropy starts near 0.69, so a mean loss of
# 100 nats is already a blow-up (raw inputs reach 1e18 in their first epoch), and a y axis stretched to show it
# would flatten every other curve. Each panel names the peak of a curve it clips.
LOSS_CAP = 100.0
SHORT_LABELS = {"none": "no BN", "bn23": "BN 2-3", "bn_all": "BN all"}


def plot_curves(results, lrs, n_rep, path):
    """One panel per (inputs, learning rate), one line per layout.

    Each line is the mean loss of the repeats that did not diverge; diverged
    repeats are counted in the panel's corner instead of being averaged in
    (one infinite loss would hide the others).  The y axis (log scale) stops
    at :data:`LOSS_CAP`; a curve that goes above it leaves the top of its
    panel, and the panel notes its peak and epoch.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "examples/train_mlp.py needs matplotlib: pip install 'fastbn[examples]'", name=exc.name
        ) from exc

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    colors = {"none": "tab:gray", "bn23": "tab:blue", "bn_all": "tab:orange"}
    means = {}
    for key, runs in results.items():
        curves = [r["curve"] for r in runs if not r["diverged"] and r["curve"]]
        if curves:
            means[key] = np.mean(curves, axis=0)
    fig, axes = plt.subplots(len(INPUTS), len(lrs), figsize=(2.6 * len(lrs) + 1, 6.8), squeeze=False, sharey="row")
    for i, inputs in enumerate(INPUTS):
        # One y range per row (the panels share it): from the lowest loss to the highest, at most LOSS_CAP.
        values = np.concatenate([m for (inp, _, _), m in means.items() if inp == inputs] or [np.ones(1)])
        values = values[np.isfinite(values) & (values > 0)]
        low = float(values.min()) / 1.5 if values.size else 0.1
        high = min(float(values.max()) * 1.5, LOSS_CAP) if values.size else LOSS_CAP
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            notes = []
            for layout in LAYOUTS:
                mean = means.get((inputs, layout, lr))
                if mean is not None:
                    ax.plot(np.arange(1, len(mean) + 1), mean, color=colors[layout], label=LAYOUT_LABELS[layout])
                    if mean.max() > high:
                        peak = int(np.argmax(mean))
                        notes.append(
                            (f"{SHORT_LABELS[layout]}: {mean[peak]:.0e} at epoch {peak + 1}, off scale", colors[layout])
                        )
                n_div = sum(r["diverged"] for r in results[(inputs, layout, lr)])
                if n_div:
                    notes.append((f"{SHORT_LABELS[layout]}: {n_div}/{n_rep} diverged", colors[layout]))
            for k, (text, color) in enumerate(notes):
                ax.text(
                    0.97,
                    0.95 - 0.08 * k,
                    text,
                    color=color,
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=7,
                    fontweight="bold",
                )
            ax.set_yscale("log")
            ax.set_ylim(low, high)
            ax.grid(True, which="major", alpha=0.3)
            if i == 0:
                ax.set_title(f"lr = {lr:g}")
            if i == len(INPUTS) - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel(f"{inputs} inputs\ntraining loss, nats (log scale)")
    handles = [plt.Line2D([], [], color=colors[k], lw=2) for k in LAYOUTS]
    fig.legend(
        handles, [LAYOUT_LABELS[k] for k in LAYOUTS], loc="lower center", ncol=len(LAYOUTS), frameon=False, fontsize=10
    )
    # Wrapped to the figure's width (about 11 characters per inch at this size), so narrow sweeps keep it all.
    width = int(11 * fig.get_figwidth())
    fig.suptitle(
        "\n".join(
            textwrap.fill(line, width)
            for line in (
                "Breast-cancer MLP with 3 hidden layers: mean minibatch cross-entropy per epoch "
                f"(mean of the runs that did not diverge, out of {n_rep})",
                f"y axis clipped at a loss of {LOSS_CAP:g}: a curve leaving the top of a panel blew up, "
                "and the panel notes its peak",
            )
        ),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(json_path, path):
    """Redraw the loss curves from a ``results.json`` this script wrote, without training anything.

    ``python -c "import sys; sys.path.insert(0, 'examples'); import train_mlp;
    train_mlp.replot('out/train_mlp/results.json', 'docs/train_mlp_loss_curves.png')"``
    """
    payload = json.loads(Path(json_path).read_text(encoding="utf-8"))
    results = {}
    for run in payload["runs"]:
        results.setdefault((run["inputs"], run["layout"], run["lr"]), []).append(run)
    lrs = sorted({lr for _, _, lr in results})
    plot_curves(results, lrs, len(payload["seeds"]), path)


# -------------------------------------------------------------------- main ---
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Raw vs standardized inputs and BN layouts over a learning-rate sweep "
        "(pure-NumPy MLP on scikit-learn's breast-cancer data)."
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/train_mlp"),
        help="directory for loss_curves.png, results.md, results.json (default out/train_mlp)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights and batch order (default 0)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per configuration with different weights and batch order (default 3)",
    )
    parser.add_argument(
        "--lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=list(DEFAULT_LRS),
        help="comma-separated learning rates (default {})".format(",".join(f"{v:g}" for v in DEFAULT_LRS)),
    )
    parser.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    parser.add_argument("--hidden", type=int, default=32, help="width of each hidden layer (default 32)")
    parser.add_argument(
        "--summary", type=Path, default=None, help="where to write the README's summary table (default OUT/summary.md)"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "repeats", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2: batch normalization needs two samples per batch")
    if not args.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        parser.error("--lrs must be positive finite numbers")
    return args


def main(argv=None):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "examples/train_mlp.py needs tqdm: pip install 'fastbn[examples]'", name=exc.name
        ) from exc

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lrs = sorted(set(args.lrs))
    data, y_train, y_test, scales = load_data(args.seed)
    seeds = [args.seed * 1000 + r for r in range(args.repeats)]

    configs = [(i, layout, lr) for i in INPUTS for layout in LAYOUTS for lr in lrs]
    results = {c: [] for c in configs}
    start = time.perf_counter()
    with tqdm(total=len(configs) * len(seeds), desc="training", unit="run", file=sys.stderr) as bar:
        for inputs, layout, lr in configs:
            X_train, X_test = data[inputs]
            bar.set_postfix_str(f"{inputs} {layout} lr={lr:g}")
            for s in seeds:
                results[(inputs, layout, lr)].append(
                    train_one(
                        X_train,
                        y_train,
                        X_test,
                        y_test,
                        layout=layout,
                        lr=lr,
                        epochs=args.epochs,
                        batch_size=args.batch_size,
                        hidden=args.hidden,
                        seed=s,
                    )
                )
                bar.update()
    elapsed = time.perf_counter() - start

    n_rep = len(seeds)
    header = ("inputs", "layout", "lr", "final train loss", "test accuracy %")
    rows = build_table(results, lrs, n_rep)
    setup = (
        f"breast-cancer data: {len(y_train)} training / {len(y_test)} test samples, 30 features "
        f"(mean |value| per feature from {scales.min():.2g} to {scales.max():.2g}); "
        f"MLP 30-{args.hidden}-{args.hidden}-{args.hidden}-2, ReLU, BN on activations, float32; "
        f"SGD, batch {args.batch_size}, {args.epochs} epochs; mean ± std over {n_rep} runs "
        f"(seed {args.seed})"
    )
    notes = findings(results, lrs, y_test)

    # The time goes to the console only, so that results.md depends on the seed alone.
    print(f"{setup}; training took {elapsed:.1f} s")
    print("final train loss: mean minibatch loss of the last epoch; test accuracy: eval mode (running statistics)")
    print(text_table(header, rows))
    print()
    for line in notes:
        print(line.replace("**", "").replace("*", ""))

    png = args.out / "loss_curves.png"
    plot_curves(results, lrs, n_rep, png)

    reproduce = (
        f"python examples/train_mlp.py --epochs {args.epochs} --seed {args.seed} "
        f"--repeats {args.repeats} --lrs {','.join(f'{v:g}' for v in lrs)}"
    )
    md = [
        "### Measured: batch normalization on a small MLP (examples/train_mlp.py)",
        "",
        f"Setup: {setup}.",
        "Final train loss is the mean minibatch loss of the last epoch; test accuracy is measured in eval mode "
        "(BN uses its running statistics). A run is *diverged* when its loss stopped being finite.",
        "",
        *notes,
        "",
        md_table(header, rows),
        "",
        f"![training loss curves]({png.name})",
        "",
        f"Reproduce: `{reproduce}`",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(md), encoding="utf-8")
    summary_path = args.summary or args.out / "summary.md"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(summary(results, lrs, y_test, n_rep, reproduce), encoding="utf-8")
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_train": len(y_train),
        "n_test": len(y_test),
        "seeds": seeds,
        "runs": [
            {"inputs": i, "layout": layout, "lr": lr, "seed": s, **r}
            for (i, layout, lr), runs in results.items()
            for s, r in zip(seeds, runs)
        ],
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(f"\nwrote {png}, {args.out / 'results.md'}, {args.out / 'results.json'}, {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
