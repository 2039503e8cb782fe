"""Every checkable entry of fastbn.conventions, against the installed frameworks themselves.

The README's Semantics table is rendered from fastbn.conventions; these tests
are what makes it true: defaults read from each framework's signature, and
the update rule, the stored variance, one value per channel and the empty
batch observed by running each framework's own batch norm.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest

from fastbn.conventions import FRAMEWORKS, table

# TensorFlow is imported by this module and by test_tensorflow.py: one worker imports it once.
pytestmark = pytest.mark.xdist_group("tensorflow")

RNG = np.random.default_rng(7)
X = RNG.normal(size=(6, 3)).astype(np.float32) * 2 + 1
BATCH_MEAN = X.astype(np.float64).mean(0)
BIASED = X.astype(np.float64).var(0)
UNBIASED = X.astype(np.float64).var(0, ddof=1)
OLD_MEAN, OLD_VAR = np.full(3, 0.5), np.full(3, 2.0)


def _expected_running(framework, momentum):
    fw = FRAMEWORKS[framework]
    m = fw.torch_momentum(momentum)  # fastbn's convention: new = (1 - m) old + m batch
    var = UNBIASED if fw.unbiased_running_var else BIASED
    return (1 - m) * OLD_MEAN + m * BATCH_MEAN, (1 - m) * OLD_VAR + m * var


def test_the_table_has_a_column_per_framework_and_is_the_committed_fragment():
    text = table()
    assert text.count("\n") == 14 and all(f.title in text for f in FRAMEWORKS.values())
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "conventions.md")
    with open(path, encoding="utf-8") as handle:
        stale = "docs/conventions.md is stale: python -m fastbn conventions --out docs/conventions.md"
        assert handle.read() == text, stale


def test_pytorch():
    torch = pytest.importorskip("torch")
    fw = FRAMEWORKS["pytorch"]
    bn = torch.nn.BatchNorm1d(3)
    assert (bn.momentum, bn.eps) == (fw.momentum, fw.eps)
    bn.momentum = 0.3
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(OLD_MEAN))
        bn.running_var.copy_(torch.tensor(OLD_VAR))
    bn(torch.tensor(X))
    mean, var = _expected_running("pytorch", 0.3)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-5)
    with pytest.raises(ValueError):
        bn(torch.ones(1, 3))  # one_value: ValueError
    before = bn.running_mean.clone()
    assert bn(torch.ones(0, 3)).shape == (0, 3) and torch.equal(before, bn.running_mean)  # empty


def test_flax():
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    fw = FRAMEWORKS["flax"]
    defaults = {name: p.default for name, p in inspect.signature(nn.BatchNorm).parameters.items()}
    assert (defaults["momentum"], defaults["epsilon"]) == (fw.momentum, fw.eps)
    module = nn.BatchNorm(use_running_average=False, momentum=0.7)
    variables = module.init(jax.random.key(0), jnp.asarray(X))
    state = {"mean": jnp.asarray(OLD_MEAN, jnp.float32), "var": jnp.asarray(OLD_VAR, jnp.float32)}
    _, updated = module.apply({**variables, "batch_stats": state}, jnp.asarray(X), mutable=["batch_stats"])
    mean, var = _expected_running("flax", 0.7)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["var"], var, rtol=1e-5)
    one, _ = module.apply(variables, jnp.full((1, 3), 5.0), mutable=["batch_stats"])
    np.testing.assert_allclose(one, 0.0, atol=1e-6)  # one_value: the bias (0)
    _, empty = module.apply(variables, jnp.zeros((0, 3)), mutable=["batch_stats"])
    assert np.all(np.isnan(empty["batch_stats"]["mean"]))  # empty: NaN statistics


def test_keras(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # read when keras is first imported; not left behind
    keras = pytest.importorskip("keras")
    fw = FRAMEWORKS["keras"]
    defaults = {name: p.default for name, p in inspect.signature(keras.layers.BatchNormalization).parameters.items()}
    assert (defaults["momentum"], defaults["epsilon"]) == (fw.momentum, fw.eps)
    layer = keras.layers.BatchNormalization(momentum=0.7)
    layer.build((None, 3))
    layer.set_weights([np.ones(3), np.zeros(3), OLD_MEAN, OLD_VAR])
    layer(X, training=True)
    mean, var = _expected_running("keras", 0.7)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(np.full((1, 3), 5.0, np.float32), training=True)), 0.0, atol=1e-6)
    assert tuple(np.asarray(layer(np.zeros((0, 3), np.float32), training=True)).shape) == (0, 3)


def test_tensorflow(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    fw = FRAMEWORKS["tensorflow"]
    defaults = {name: p.default for name, p in inspect.signature(tf.compat.v1.nn.fused_batch_norm).parameters.items()}
    assert (defaults["exponential_avg_factor"], defaults["epsilon"]) == (fw.momentum, fw.eps)
    x4 = X.reshape(6, 1, 1, 3)
    ones, zeros = tf.ones(3), tf.zeros(3)
    _, mean, var = tf.compat.v1.nn.fused_batch_norm(
        x4, ones, zeros, OLD_MEAN.astype(np.float32), OLD_VAR.astype(np.float32), exponential_avg_factor=0.3
    )
    want_mean, want_var = _expected_running("tensorflow", 0.3)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(np.full((1, 1, 1, 3), 5.0, np.float32), ones, zeros)
    np.testing.assert_allclose(y, 0.0, atol=1e-6)
    y, mean, _ = tf.compat.v1.nn.fused_batch_norm(np.zeros((0, 1, 1, 3), np.float32), ones, zeros)
    assert tuple(y.shape) == (0, 1, 1, 3) and np.all(np.isnan(mean))
