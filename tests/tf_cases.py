"""TensorFlow's batch-norm conventions mapped onto fastbn's, in one place, for tests/test_tensorflow.py.

Every difference between TensorFlow's batch-norm ops and fastbn's PyTorch-style API that the
TensorFlow tests meet is written down here twice: as a row of ``CONVENTIONS`` (prose, for the
README's table) and as code in ``fused_batch_norm``, which is TensorFlow's
``tf.compat.v1.nn.fused_batch_norm`` contract implemented on ``fastbn.forward``.  The tests compare
that function against the real TensorFlow op, so a row that is wrong makes a test fail.

Tolerances of the comparisons against TensorFlow live in ``TF_TOLERANCES``, and only there.  This
module does not import TensorFlow (the test module does, once).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

import fastbn

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Convention:
    topic: str
    tensorflow: str
    fastbn: str
    mapping: str


# Each row is checked by the test named in its mapping column (tests/test_tensorflow.py).
CONVENTIONS = (
    Convention(
        "layout",
        "data_format 'NHWC'/'NDHWC' (channels last) or 'NCHW'/'NCDHW'",
        "axis: the channel axis, default 1",
        "NHWC, NDHWC -> axis=-1; NCHW, NCDHW -> axis=1 (test_fused_training, test_fused_inference)",
    ),
    Convention(
        "batch variance returned in training",
        "fused_batch_norm returns the Bessel-corrected variance var * n / max(n - 1, 1); "
        "tf.nn.moments returns the biased one",
        "moments() and saved.invstd use the biased variance; the running variance is updated with the "
        "unbiased one var * n / (n - 1)",
        "fused_batch_norm's (batch_mean, batch_variance) = fastbn's running_mean, running_var after a "
        "forward with momentum=exponential_avg_factor (momentum=1 when the factor is 1, any initial "
        "values); the output y is normalised with the biased variance in both (test_fused_training)",
    ),
    Convention(
        "running statistics update",
        "exponential_avg_factor f: returns (1 - f) * old + f * batch, as new tensors; f = 1 (the "
        "default) ignores the old values",
        "momentum m: running = (1 - m) * running + m * batch, in place",
        "momentum = exponential_avg_factor (the same direction: NOT Keras's momentum = 1 - f) "
        "(test_fused_training, test_fused_running_statistics_over_steps)",
    ),
    Convention(
        "epsilon",
        "added to the variance inside the square root; fused_batch_norm's default 1e-3; "
        "epsilon=0 is accepted, in training too",
        "eps added to the variance inside the square root; default 1e-5; must be > 0 with batch "
        "statistics, may be 0 in eval mode with running statistics (as PyTorch)",
        "eps = epsilon (pass 1e-3 explicitly); epsilon=0 in training raises in fastbn (test_epsilon)",
    ),
    Convention(
        "inference with given mean and variance",
        "is_training=False normalises with the given mean and variance, used as they are; returns them unchanged",
        "training=False with running_mean, running_var",
        "the same formula: y = (x - mean) / sqrt(var + eps) * scale + offset (test_fused_inference)",
    ),
    Convention(
        "float16 / bfloat16 input",
        "fused_batch_norm: y in x's dtype, scale/offset/mean/variance float32; tf.nn.moments and "
        "tf.nn.weighted_moments of float16 compute in float32 and round the results to float16; "
        "of bfloat16 they compute in bfloat16",
        "y in x's dtype; parameters and statistics always float32 (moments() returns float32)",
        "compare fastbn's float32 statistics with TensorFlow's moments of x cast to float32 "
        "(test_moments_axes, test_fused_training)",
    ),
    Convention(
        "one value per channel in training",
        "fused_batch_norm: batch variance 0 (n / max(n - 1, 1) keeps it finite), y = offset",
        "ValueError, as PyTorch",
        "deliberate PyTorch convention (test_one_value_per_channel_in_training_raises)",
    ),
    Convention(
        "empty batch",
        "fused_batch_norm: empty y; the batch mean and variance are NaN, and so are the returned "
        "running statistics when exponential_avg_factor != 1",
        "empty y; running statistics untouched",
        "deliberate: fastbn does not write NaN into the running statistics (test_fused_empty_batch)",
    ),
    Convention(
        "weighted moments",
        "tf.nn.weighted_moments(x, axes, frequency_weights): sum(w x) / sum(w) and the biased "
        "sum(w (x - mean)^2) / sum(w); 0 where sum(w) = 0 (div_no_nan)",
        "moments(x, axes=..., weights=w) (and mask=m, the same as weights=m)",
        "the same (test_weighted_moments, test_weighted_moments_zero_weight, test_mask)",
    ),
    Convention(
        "parameters of batch_normalization",
        "any shape broadcastable to x (e.g. (1, 1, 1, C) from moments with keepdims), possibly over several axes",
        "normalize: (C,) or broadcastable varying along the one channel axis",
        "parameters over several adjacent axes: merge those axes of x into one channel axis "
        "(test_batch_normalization_arbitrary_shapes, test_batch_normalization_parameters_over_two_axes)",
    ),
)


def markdown_table() -> str:
    """``CONVENTIONS`` as a Markdown table, for the README (``python tests/tf_cases.py`` prints it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| | TensorFlow | fastbn | mapping (checked by) |", "|---|---|---|---|"]
    lines += [f"| {cell(c.topic)} | {cell(c.tensorflow)} | {cell(c.fastbn)} | {cell(c.mapping)} |" for c in CONVENTIONS]
    return "\n".join(lines)


def data_format_axis(data_format: str) -> int:
    """fastbn's channel axis for a TensorFlow data_format."""
    return {"NHWC": -1, "NDHWC": -1, "NCHW": 1, "NCDHW": 1}[data_format]


def fused_batch_norm(
    x,
    scale,
    offset,
    mean=None,
    variance=None,
    *,
    epsilon=1e-3,
    data_format="NHWC",
    is_training=True,
    exponential_avg_factor=1.0,
):
    """``tf.compat.v1.nn.fused_batch_norm``'s contract on ``fastbn.forward``: (y, mean out, variance out).

    Training returns TensorFlow's ``(batch_mean, batch_variance)`` as fastbn's running statistics
    after one update with ``momentum = exponential_avg_factor`` (which makes the variance the
    Bessel-corrected one); inference normalises with the given statistics and returns them.
    """
    axis = data_format_axis(data_format)
    channels = x.shape[axis]
    if not is_training:
        y, _ = fastbn.forward(
            x, scale, offset, running_mean=mean, running_var=variance, training=False, eps=epsilon, axis=axis
        )
        return y, mean, variance
    if exponential_avg_factor == 1.0:
        # TensorFlow ignores the old values then; with momentum 1 fastbn does too.
        running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    else:
        running_mean, running_var = np.array(mean, np.float32), np.array(variance, np.float32)
    y, _ = fastbn.forward(
        x,
        scale,
        offset,
        running_mean=running_mean,
        running_var=running_var,
        training=True,
        momentum=exponential_avg_factor,
        eps=epsilon,
        axis=axis,
    )
    return y, running_mean, running_var


# ---------------------------------------------------------------------------------------------
# Tolerances against TensorFlow: the ONLY place they are set.
#
# A comparison passes where |actual - expected| <= rtol * |expected| + atol * scale + floor,
# elementwise, `expected` being TensorFlow's result and `scale` the size of the terms that make
# up the quantity (given by the test: max|x| per channel for a mean, |x - mean| * invstd * |scale|
# + |offset| for y, sum |terms| for a per-channel gradient sum).  Two implementations are compared,
# so both one's rounding errors count: fastbn accumulates in float64 on the CPU and rounds once,
# TensorFlow (Eigen and oneDNN on the CPU) works in float32 throughout for float16, bfloat16 and
# float32 input and in float64 for float64.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float
    floor: float = 0.0
    reason: str = ""


_F32 = Tol(
    rtol=1e-5,
    atol=1e-5,
    reason="u = 6e-8: a few ulps for the elementwise arithmetic, and ~u*log2(n) for blocked sums; "
    "fastbn's own error is ~1 ulp (float64 accumulation)",
)
TF_TOLERANCES = {
    np.dtype(np.float64): Tol(
        rtol=1e-12,
        atol=1e-12,
        reason="both compute in float64 (u = 1.1e-16); 1e-12 leaves 1e4 ulps for differently ordered sums",
    ),
    np.dtype(np.float32): _F32,
    # 16-bit outputs: each side rounds its own (float32 or float64) value once to the output format,
    # so the two may land on adjacent values: one ulp of the format (2^-10 relative for float16, 2^-7
    # for bfloat16) on top of the float32 difference; the floor is the spacing of the subnormals.
    np.dtype(np.float16): Tol(
        rtol=2.0**-10 + _F32.rtol, atol=_F32.atol, floor=2.0**-24, reason="1 float16 ulp + float32"
    ),
    BFLOAT16: Tol(rtol=2.0**-7 + _F32.rtol, atol=_F32.atol, floor=2.0**-133, reason="1 bfloat16 ulp + float32"),
}


def statistics_atol(n: int) -> float:
    """Extra atol for results that depend on TensorFlow's float32 statistics over n values per channel.

    TensorFlow's CPU kernels (Eigen for float16 and bfloat16, oneDNN for float32) sum in float32
    without compensation; measured on the upstream 27x131x127x6 case (n = 4.5e5 per channel), its
    batch variance is off by up to 1e-4 relative in the float16 path (2e-5 in the float32 one) where
    fastbn's is off by 1e-7.  A random-walk bound u * sqrt(n), with a factor 8 of margin, covers
    that (8 * 6e-8 * 670 = 3.2e-4) and vanishes for the small cases (n <= 400: 1e-5).
    """
    return 8 * 2.0**-24 * float(np.sqrt(max(n, 1)))


def assert_tf_close(actual, expected, dtype, scale=None, what="array", n=0) -> None:
    """|actual - expected| <= rtol |expected| + atol scale + floor with the tolerance of ``dtype``.

    ``scale`` defaults to max |expected| (a scalar); shapes must agree exactly.  ``n``: the count per
    channel of TensorFlow's float32 statistics the result depends on (see ``statistics_atol``).
    """
    tol = TF_TOLERANCES[np.dtype(dtype)]
    if n and np.dtype(dtype) != np.float64:
        tol = Tol(tol.rtol, tol.atol + statistics_atol(n), tol.floor, f"{tol.reason}; + float32 sums over n = {n}")
    a = np.asarray(np.asarray(actual).astype(np.float64))
    e = np.asarray(np.asarray(expected).astype(np.float64))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != TensorFlow's {e.shape}"
    if scale is None:
        scale = np.max(np.abs(e)) if e.size else 0.0
    allowed = tol.rtol * np.abs(e) + tol.atol * np.asarray(scale, np.float64) + tol.floor
    err = np.abs(a - e)
    bad = ~(err <= allowed)  # NaN in either side fails, unless both are NaN (checked next)
    bad &= ~(np.isnan(a) & np.isnan(e))
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - allowed, -np.inf)), e.shape) if e.ndim else ()
        raise AssertionError(
            f"{what} ({np.dtype(dtype).name}): {int(bad.sum())} of {e.size} differ from TensorFlow; worst at "
            f"{tuple(int(k) for k in i)}: fastbn {a[i]!r}, TensorFlow {e[i]!r}, |diff| {err[i]:.3g} > "
            f"allowed {np.broadcast_to(allowed, e.shape)[i]:.3g} ({tol.reason})"
        )


if __name__ == "__main__":
    print(markdown_table())
