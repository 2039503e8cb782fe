"""Checks of ``fastbn.keras.BatchNormalization`` against ``keras.layers.BatchNormalization``, on one Keras backend.

Keras fixes its backend when it is imported, so tests/test_keras.py runs this
script once per backend (``python tests/keras_worker.py jax``) and turns
every check into a test.  Each check runs on its own; the script prints one
line ``RESULTS: {json}`` mapping each check's name to ``"ok"`` or the
failure's traceback.  ``CHECKS`` (importable without Keras) lists the names.

Ported checks name the upstream test they follow: keras-team/keras,
``keras/src/layers/normalization/batch_normalization_test.py`` and
``keras/src/ops/nn_test.py``; they are re-written against fastbn's layer and
compare with Keras's own layer wherever possible.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

STARTED = time.perf_counter()

CHECKS = [
    "forward_against_keras",
    "gradients_against_keras",
    "axis_variants",
    "center_scale_off",
    "float16_and_mixed_precision",
    "float64",
    "biased_variance_near_the_float32_limit",
    "training_none_and_trainable_false",
    "weights_interchange",
    "config_and_saving",
    "fit_evaluate_against_keras",
    "errors",
    "mask",
    "renorm",
    "ported_layer_tests",
    "ported_ops_tests",
]
UNSUPPORTED_BACKEND_CHECKS = ["unsupported_backend_error"]

_keras = None


def _load():
    global _keras
    import keras  # after KERAS_BACKEND is set

    _keras = keras
    return keras


# ---------------------------------------------------------------------------------------------------
# helpers


def np_(value):
    import numpy as np

    return np.asarray(_keras.ops.convert_to_numpy(value))


def close(actual, expected, what, rtol=1e-5, atol=1e-6):
    import numpy as np

    actual, expected = np_(actual).astype(np.float64), np_(expected).astype(np.float64)
    if expected.ndim == 0:
        expected = np.broadcast_to(expected, actual.shape)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != {expected.shape}")
    if not np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
        diff = np.abs(actual - expected)
        raise AssertionError(
            f"{what}: max abs diff {diff.max():.3g} (rtol={rtol}, atol={atol}); "
            f"actual {actual.ravel()[:4]}, expected {expected.ravel()[:4]}"
        )


def raises(kinds, words, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except kinds as exc:
        message = str(exc)
        for word in words:
            if word not in message:
                raise AssertionError(f"expected {word!r} in the message, got: {message}") from exc
        return exc
    raise AssertionError(f"expected {kinds} naming {words}, nothing raised")


def pair(seed=0, shape=None, **kwargs):
    """A Keras layer and a fastbn layer with the same (random) weights, built for ``shape``."""
    import numpy as np

    from fastbn.keras import BatchNormalization

    ref = _keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(**kwargs)
    ref.build(shape)
    ours.build(shape)
    rng = np.random.default_rng(seed)
    weights = []
    for w in ref.get_weights():
        if w.shape == ():
            weights.append(w)
        else:
            weights.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
    ref.set_weights(weights)
    ours.set_weights(weights)
    return ref, ours


def value_and_grads(layer, x, cotangent, training):
    """``y`` and the gradients of ``sum(y * cotangent)`` for ``x`` and each trainable weight, as NumPy."""
    import numpy as np

    backend = _keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]
        cot = jnp.asarray(cotangent)

        def loss(x, trainable):
            y, new_frozen = layer.stateless_call(trainable, frozen, x, training=training)
            return jnp.sum(y.astype(jnp.float32) * cot), (y, new_frozen)

        (_, (y, new_frozen)), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            jnp.asarray(x), trainable
        )
        for variable, value in zip(layer.non_trainable_variables, new_frozen):
            variable.assign(value)  # as a training call on the other backends updates the state
        return np.asarray(y), [np.asarray(gx)] + [np.asarray(g) for g in gw]
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        for v in layer.trainable_variables:
            v.value.grad = None
        y = layer(xt, training=training)
        (y.float() * torch.tensor(cotangent)).sum().backward()
        grads = [xt.grad] + [v.value.grad for v in layer.trainable_variables]
        return y.detach().numpy(), [g.numpy() for g in grads]
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * cotangent)
    grads = tape.gradient(loss, [xt, *layer.trainable_variables])
    return y.numpy(), [g.numpy() for g in grads]


def adapter_has_masks():
    backend = _keras.backend.backend()
    if backend == "jax":
        import fastbn.jax as adapter
    elif backend == "torch":
        import fastbn.torch as adapter
    else:
        import inspect

        import fastbn

        return "weights" in inspect.signature(fastbn.forward).parameters
    return hasattr(adapter, "moments") and hasattr(adapter, "normalize")


# ---------------------------------------------------------------------------------------------------
# checks


def forward_against_keras():
    """Training output, moving statistics after several steps, and inference output, as Keras's layer."""
    import numpy as np

    rng = np.random.default_rng(1)
    for shape, axis, momentum, eps in (
        ((16, 5), -1, 0.99, 1e-3),
        ((4, 3, 5, 2), 1, 0.5, 1e-5),
        ((3, 7, 4), 2, 0.0, 0.1),
    ):
        ref, ours = pair(2, shape, axis=axis, momentum=momentum, epsilon=eps)
        for step in range(3):
            x = rng.normal(3.0, 2.0 + step, shape).astype("float32")
            close(ours(x, training=True), ref(x, training=True), f"train y {shape} axis={axis} step {step}")
            close(ours.moving_mean, ref.moving_mean, f"moving_mean {shape} step {step}")
            # Biased moving variance, as Keras keeps it (an unbiased one would be n/(n-1) larger).
            close(ours.moving_variance, ref.moving_variance, f"moving_variance {shape} step {step}")
        x = rng.normal(3.0, 2.0, shape).astype("float32")
        close(ours(x, training=False), ref(x, training=False), f"inference y {shape} axis={axis}")


def gradients_against_keras():
    """Gradients of x, gamma and beta in training and inference, as Keras's layer (by autodiff of its ops)."""
    import numpy as np

    rng = np.random.default_rng(3)
    for shape, axis in (((12, 4), -1), ((3, 4, 5, 2), 1)):
        for training in (True, False):
            ref, ours = pair(4, shape, axis=axis, momentum=0.9)
            x = rng.normal(1.0, 3.0, shape).astype("float32")
            cot = rng.normal(size=shape).astype("float32")
            y_ref, g_ref = value_and_grads(ref, x, cot, training)
            y_ours, g_ours = value_and_grads(ours, x, cot, training)
            close(y_ours, y_ref, f"y {shape} training={training}")
            assert len(g_ours) == len(g_ref) == 3
            for name, a, b in zip(("dx", "dgamma", "dbeta"), g_ours, g_ref):
                close(a, b, f"{name} {shape} training={training}", rtol=1e-4, atol=1e-5)


def axis_variants():
    """axis as an int of each position, negative ones, and as a list (Keras 2's multi-axis form)."""
    import numpy as np

    rng = np.random.default_rng(5)
    shape = (4, 3, 5, 2)
    for axis in (1, 2, 3, -1, -2, -3):
        ref, ours = pair(6, shape, axis=axis, momentum=0.8)
        x = rng.normal(size=shape).astype("float32")
        close(ours(x, training=True), ref(x, training=True), f"axis={axis} train")
        close(ours.moving_variance, ref.moving_variance, f"axis={axis} moving_variance")
        close(ours(x), ref(x), f"axis={axis} inference")
    # A list of feature axes: statistics per (axis1, axis3) pair.  Keras 3's layer takes one axis;
    # the reference is Keras's layer on the input with those axes moved last and flattened.
    from fastbn.keras import BatchNormalization

    ours = BatchNormalization(axis=[3, 1], momentum=0.8)
    ours.build(shape)
    assert tuple(ours.gamma.shape) == (3, 2), ours.gamma.shape
    ref = _keras.layers.BatchNormalization(axis=-1, momentum=0.8)
    ref.build((4, 5, 6))
    weights = [rng.uniform(0.5, 1.5, (3, 2)).astype("float32") for _ in range(4)]
    ours.set_weights(weights)
    ref.set_weights([w.reshape(-1) for w in weights])
    x = rng.normal(size=shape).astype("float32")
    flat = np.transpose(x, (0, 2, 1, 3)).reshape(4, 5, 6)

    def unflat(y):
        return np.transpose(np_(y).reshape(4, 5, 3, 2), (0, 2, 1, 3))

    close(ours(x, training=True), unflat(ref(flat, training=True)), "axis=[3, 1] train")
    close(np_(ours.moving_variance).reshape(-1), ref.moving_variance, "axis=[3, 1] moving_variance")
    close(ours(x), unflat(ref(flat)), "axis=[3, 1] inference")


def center_scale_off():
    """center=False / scale=False: no beta / gamma weight, output and gradients as Keras's."""
    import numpy as np

    rng = np.random.default_rng(7)
    for center, scale, count in ((False, True, 1), (True, False, 1), (False, False, 0)):
        ref, ours = pair(8, (10, 3), center=center, scale=scale)
        assert len(ours.trainable_weights) == len(ref.trainable_weights) == count
        assert [w.name for w in ours.weights] == [w.name for w in ref.weights], ours.weights
        x = rng.normal(size=(10, 3)).astype("float32")
        cot = rng.normal(size=(10, 3)).astype("float32")
        for training in (True, False):
            y_ref, g_ref = value_and_grads(ref, x, cot, training)
            y_ours, g_ours = value_and_grads(ours, x, cot, training)
            close(y_ours, y_ref, f"center={center} scale={scale} training={training}")
            for a, b in zip(g_ours, g_ref):
                close(a, b, f"gradient center={center} scale={scale}", rtol=1e-4, atol=1e-5)


def float16_and_mixed_precision():
    """float16 and bfloat16 input (Keras computes in float32 and casts back), and the mixed_float16 policy."""
    import numpy as np

    rng = np.random.default_rng(9)
    for dtype in ("float16", "bfloat16"):  # fastbn takes both as they are, with float32 statistics
        x = _keras.ops.cast(rng.normal(2.0, 3.0, (16, 4)), dtype)
        ref, ours = pair(10, (16, 4), momentum=0.9)
        y_ours, y_ref = ours(x, training=True), ref(x, training=True)
        assert _keras.backend.standardize_dtype(y_ours.dtype) == "float32"  # the layer's compute dtype, as Keras
        close(y_ours, y_ref, f"{dtype} input, train", rtol=1e-5, atol=1e-5)
        close(ours.moving_variance, ref.moving_variance, f"{dtype} input, moving_variance")
        close(ours(x), ref(x), f"{dtype} input, inference", rtol=1e-5, atol=1e-5)
    x = rng.normal(2.0, 3.0, (16, 4)).astype("float16")
    # mixed_float16: float16 compute, float32 variables.
    ref = _keras.layers.BatchNormalization(dtype="mixed_float16", momentum=0.9)
    from fastbn.keras import BatchNormalization

    ours = BatchNormalization(dtype="mixed_float16", momentum=0.9)
    for layer in (ref, ours):
        layer.build((16, 4))
    assert [_keras.backend.standardize_dtype(w.dtype) for w in ours.weights] == ["float32"] * 4
    cot = rng.normal(size=(16, 4)).astype("float32")
    for training in (True, False):
        y_ref, g_ref = value_and_grads(ref, x, cot, training)
        y_ours, g_ours = value_and_grads(ours, x, cot, training)
        assert y_ours.dtype == y_ref.dtype == np.float16, (y_ours.dtype, y_ref.dtype)
        # One float16 rounding of the same float32 value, give or take its last bit.
        close(y_ours, y_ref, f"mixed_float16 y training={training}", rtol=2e-3, atol=2e-3)
        for a, b in zip(g_ours, g_ref):
            close(a, b, f"mixed_float16 gradient training={training}", rtol=3e-3, atol=3e-3)
    close(ours.moving_mean, ref.moving_mean, "mixed_float16 moving_mean")
    close(ours.moving_variance, ref.moving_variance, "mixed_float16 moving_variance", rtol=1e-4)


def float64():
    """float64 input computes in float64, as Keras (needs jax_enable_x64 on JAX, set by the worker)."""
    import numpy as np

    rng = np.random.default_rng(11)
    ref, ours = pair(12, (9, 3), dtype="float64", momentum=0.7)
    x = rng.normal(size=(9, 3))
    y_ours, y_ref = ours(x, training=True), ref(x, training=True)
    assert _keras.backend.standardize_dtype(y_ours.dtype) == "float64"
    # Keras's own layer is float32-accurate only on the JAX and PyTorch backends (1e-7 off NumPy's
    # float64 here); fastbn's is float64-accurate: compared with Keras's loosely, with NumPy tightly.
    gamma, beta = np_(ours.gamma), np_(ours.beta)
    expected = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-3) * gamma + beta
    close(y_ours, expected, "float64 train against NumPy", rtol=1e-12, atol=1e-12)
    close(y_ours, y_ref, "float64 train against Keras", rtol=1e-6, atol=1e-6)
    close(ours.moving_variance, ref.moving_variance, "float64 moving_variance", rtol=1e-6, atol=1e-6)
    close(ours(x), ref(x), "float64 inference", rtol=1e-6, atol=1e-6)


def biased_variance_near_the_float32_limit():
    """n = 2, values +-1.5e19: the biased variance 2.25e38 is finite, the unbiased one (fastbn's, twice it) is not."""
    import numpy as np

    _, ours = pair(15, (2, 2), momentum=0.0)
    x = np.array([[1.5e19, 1.0], [-1.5e19, 2.0]], "float32")
    ours(x, training=True)
    close(ours.moving_variance, np.array([2.25e38, 0.25]), "moving_variance", rtol=2e-7, atol=0)


def training_none_and_trainable_false():
    """training=None is inference; trainable=False runs in inference mode even with training=True."""
    import numpy as np

    rng = np.random.default_rng(13)
    ref, ours = pair(14, (8, 3), momentum=0.5)
    x = rng.normal(4.0, 2.0, (8, 3)).astype("float32")
    before = np_(ours.moving_mean).copy()
    close(ours(x), ours(x, training=False), "training=None is inference")
    close(ours(x), ref(x), "inference as Keras")
    close(ours.moving_mean, before, "training=None leaves the moving mean")
    ours.trainable = ref.trainable = False
    close(ours(x, training=True), ref(x, training=True), "trainable=False, training=True")
    close(ours(x, training=True), ours(x, training=False), "trainable=False is inference")
    close(ours.moving_mean, before, "trainable=False leaves the moving mean")


def weights_interchange():
    """set_weights(keras_layer.get_weights()) both ways, names and order as Keras's layer."""
    import numpy as np

    rng = np.random.default_rng(15)
    ref, ours = pair(16, (6, 4))
    assert [w.name for w in ours.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.name for w in ours.weights] == [w.name for w in ref.weights]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in ref.weights]
    x = rng.normal(size=(6, 4)).astype("float32")
    ref(x, training=True)
    ours.set_weights(ref.get_weights())
    close(ours(x), ref(x), "Keras's weights in fastbn's layer")
    ours(x * 3 + 1, training=True)
    ref.set_weights(ours.get_weights())
    close(ref(x), ours(x), "fastbn's weights in Keras's layer")


def config_and_saving():
    """get_config/from_config; .weights.h5 between the two layers' models; a .keras model with fastbn's layer."""
    import numpy as np

    from fastbn.keras import BatchNormalization

    layer = BatchNormalization(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        gamma_initializer="random_normal",
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
        name="bn_cfg",
    )
    config = layer.get_config()
    ref_config = _keras.layers.BatchNormalization(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        gamma_initializer="random_normal",
        gamma_regularizer="l2",
        gamma_constraint="non_neg",
        name="bn_cfg",
    ).get_config()
    assert set(config) == set(ref_config), set(config) ^ set(ref_config)
    for key in config:
        assert config[key] == ref_config[key], (key, config[key], ref_config[key])
    again = BatchNormalization.from_config(config)
    assert again.get_config() == config
    assert _keras.saving.get_registered_name(BatchNormalization) == "fastbn>BatchNormalization"

    def model(cls):
        return _keras.Sequential(
            [
                _keras.Input((5,), name="cfg_in"),
                _keras.layers.Dense(4, name="cfg_dense"),
                cls(momentum=0.5, name="bn"),
                _keras.layers.Dense(2),
            ]
        )

    rng = np.random.default_rng(17)
    x = rng.normal(size=(8, 5)).astype("float32")
    keras_model, fastbn_model = model(_keras.layers.BatchNormalization), model(BatchNormalization)
    keras_model(x, training=True)  # moving statistics away from their initial values
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.weights.h5")
        keras_model.save_weights(path)
        fastbn_model.load_weights(path)
        close(fastbn_model(x), keras_model(x), ".weights.h5 from Keras's layer into fastbn's")
        fastbn_model(x * 2, training=True)
        path = os.path.join(tmp, "f.weights.h5")
        fastbn_model.save_weights(path)
        keras_model.load_weights(path)
        close(keras_model(x), fastbn_model(x), ".weights.h5 from fastbn's layer into Keras's")
        path = os.path.join(tmp, "f.keras")
        fastbn_model.save(path)
        loaded = _keras.saving.load_model(path)
        assert isinstance(loaded.get_layer("bn"), BatchNormalization), type(loaded.get_layer("bn"))
        close(loaded(x), fastbn_model(x), ".keras model reloaded")
        close(loaded(x, training=True), fastbn_model(x, training=True), ".keras model reloaded, training")


def _fit_pair(build, x, y, epochs, loss, metrics, batch_size):
    """Fit two models that differ only in their batch-norm class from the same initial weights."""
    from fastbn.keras import BatchNormalization

    models = []
    for cls in (_keras.layers.BatchNormalization, BatchNormalization):
        _keras.utils.set_random_seed(1)
        models.append(build(cls))
    ref, ours = models
    ours.set_weights(ref.get_weights())
    histories = []
    for model in (ref, ours):
        model.compile(optimizer=_keras.optimizers.SGD(0.05, momentum=0.9), loss=loss, metrics=metrics)
        histories.append(model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0).history)
    return ref, ours, histories


def fit_evaluate_against_keras():
    """Dense and Conv2D models fit for 3 epochs with either layer: same losses, metrics, weights, statistics.

    Both models start from the same weights and see the same batches in the
    same order; they differ by float32 rounding only (fastbn reduces in
    float64, Keras in float32).  Measured after 3 epochs of SGD with
    momentum: at most ~1.2e-7 absolute in any weight or statistic (values of
    order 1), losses within 2e-7 relative.  The tolerance, 1e-5 relative
    plus 1e-6 absolute, leaves room for other BLAS orderings and is still
    far below a real difference (an unbiased moving variance would be off by
    n/(n-1), 6% at batch 16; a wrong momentum convention by far more).  The
    absolute part covers the Dense bias before the layer: batch norm
    removes its gradient, so it holds rounding noise around 1e-8.
    """
    import numpy as np

    rng = np.random.default_rng(19)
    layers = _keras.layers

    def dense(cls):
        return _keras.Sequential(
            [
                _keras.Input((6,)),
                layers.Dense(8),
                cls(momentum=0.9),
                layers.Activation("relu"),
                layers.Dense(3),
            ]
        )

    def conv(cls):
        return _keras.Sequential(
            [
                _keras.Input((6, 6, 2)),
                layers.Conv2D(4, 3),
                cls(momentum=0.8),
                layers.Activation("relu"),
                layers.Flatten(),
                layers.Dense(2, activation="softmax"),
            ]
        )

    cases = (
        (dense, rng.normal(size=(64, 6)).astype("float32"), rng.normal(size=(64, 3)).astype("float32"), "mse", ["mae"]),
        (
            conv,
            rng.normal(size=(48, 6, 6, 2)).astype("float32"),
            np.eye(2, dtype="float32")[rng.integers(0, 2, 48)],
            "categorical_crossentropy",
            ["accuracy"],
        ),
    )
    for build, x, y, loss, metrics in cases:
        ref, ours, (h_ref, h_ours) = _fit_pair(build, x, y, 3, loss, metrics, 16)
        assert set(h_ref) == set(h_ours), (h_ref, h_ours)
        for key in h_ref:
            close(h_ours[key], h_ref[key], f"{build.__name__} history {key}", rtol=1e-5, atol=1e-6)
        for a, b, weight in zip(ours.get_weights(), ref.get_weights(), ref.weights):
            close(a, b, f"{build.__name__} {weight.path} after fit", rtol=1e-5, atol=1e-6)
        e_ref = ref.evaluate(x, y, batch_size=16, verbose=0)
        e_ours = ours.evaluate(x, y, batch_size=16, verbose=0)
        close(e_ours, e_ref, f"{build.__name__} evaluate", rtol=1e-5, atol=1e-6)


def errors():
    """Bad arguments name themselves, before anything runs; fastbn's single-value rule in training."""
    import numpy as np

    from fastbn.keras import BatchNormalization

    raises(ValueError, ["synchronized"], BatchNormalization, synchronized=True)
    BatchNormalization(synchronized=False)
    raises(ValueError, ["momentum"], BatchNormalization, momentum=1.5)
    raises(TypeError, ["momentum"], BatchNormalization, momentum="high")
    raises(ValueError, ["epsilon"], BatchNormalization, epsilon=0.0)
    raises(TypeError, ["axis"], BatchNormalization, axis="last")
    raises(TypeError, ["axis"], BatchNormalization, axis=[])
    raises(TypeError, ["center"], BatchNormalization, center=1)
    raises(ValueError, ["axis", "out of bounds"], BatchNormalization(axis=3).build, (4, 3))
    raises(ValueError, ["axis", "repeat"], BatchNormalization(axis=[1, -1]).build, (4, 3))
    layer = BatchNormalization()
    layer.build((1, 3))
    before = np_(layer.moving_mean).copy()
    x = np.ones((1, 3), "float32")
    raises(ValueError, ["more than 1 value per channel"], layer, x, training=True)
    close(layer.moving_mean, before, "moving mean after the error")
    layer(x)  # inference of one sample is fine
    # An empty batch: an empty output and the moving statistics untouched (PyTorch's and fastbn's rule;
    # Keras's own layer makes them NaN, the mean of nothing).
    ref, ours = pair(18, (4, 3))
    empty = np.zeros((0, 3), "float32")
    before = np_(ours.moving_mean).copy()
    for training in (True, False):
        assert tuple(ours(empty, training=training).shape) == (0, 3)
    close(ours.moving_mean, before, "moving mean after an empty batch")
    ref(empty, training=True)
    assert np.isnan(np_(ref.moving_mean)).all(), "Keras's layer changed its empty-batch behaviour"
    if _keras.backend.backend() == "tensorflow":
        # In a graph traced with an unknown batch size, the batch is found empty only when it runs.
        import tensorflow as tf

        spec = [tf.TensorSpec((None, 3), tf.float32)]
        step = tf.function(lambda v: ours(v, training=True), input_signature=spec)
        moving = [np_(ours.moving_mean).copy(), np_(ours.moving_variance).copy()]
        assert tuple(step(empty).shape) == (0, 3)
        after = [np_(ours.moving_mean), np_(ours.moving_variance)]
        assert all(np.array_equal(a, b) for a, b in zip(after, moving)), (
            "an empty batch in a graph moved the statistics"
        )
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(step(empty))
        grads = tape.gradient(loss, [ours.gamma, ours.beta])
        assert all(np.array_equal(np_(g), np.zeros(3, "float32")) for g in grads), grads
        batch = np.random.default_rng(19).normal(2.0, 3.0, (5, 3)).astype("float32")
        step(batch)  # the same graph, on a batch that is not empty, updates them
        assert not np.array_equal(np_(ours.moving_mean), moving[0])
        # and with a mask, whose weighted statistics take another route
        ours = BatchNormalization()
        ours.build((None, 4, 3))
        spec = [tf.TensorSpec((None, 4, 3), tf.float32), tf.TensorSpec((None, 4), tf.bool)]
        masked = tf.function(lambda v, m: ours(v, training=True, mask=m), input_signature=spec)
        moving = np_(ours.moving_mean).copy()
        assert tuple(masked(np.zeros((0, 4, 3), "float32"), np.zeros((0, 4), bool)).shape) == (0, 4, 3)
        assert np.array_equal(np_(ours.moving_mean), moving), "an empty masked batch in a graph moved the mean"
    layer = BatchNormalization()
    layer.build((4, 5, 3))
    raises(ValueError, ["mask"], layer, np.ones((4, 5, 3), "float32"), training=True, mask=np.ones((4,), bool))
    layer = BatchNormalization(axis=1)
    layer.build((4, 5, 3))
    # A mask over (batch, axis 1) for features on axis 1: the shape is the input's less its last axis,
    # not less the feature axis (Keras's layer would broadcast it along the features).
    raises(ValueError, ["mask", "(4, 3)"], layer, np.ones((4, 5, 3), "float32"), training=True, mask=np.ones((4, 5)))


def mask():
    """Keras's mask: statistics over the unmasked positions only, output everywhere.

    Until fastbn's adapters have differentiable ``moments(mask=)`` and
    ``normalize``, the layer refuses a mask in training with a ValueError
    naming it; inference ignores the mask, as Keras's layer does.
    """
    import numpy as np

    rng = np.random.default_rng(21)
    shape = (4, 6, 3)
    x = rng.normal(2.0, 1.5, shape).astype("float32")
    m = rng.random((4, 6)) > 0.4
    m[0, 0] = True
    ref, ours = pair(22, shape, momentum=0.5)
    close(ours(x, mask=m), ref(x, mask=m), "masked inference")
    if not adapter_has_masks():
        raises(ValueError, ["mask"], ours, x, training=True, mask=m)
        return
    cot = rng.normal(size=shape).astype("float32")
    mt = _keras.ops.convert_to_tensor(m)
    backend = _keras.backend.backend()

    def masked_grads(layer):
        if backend == "jax":
            import jax
            import jax.numpy as jnp

            trainable = [v.value for v in layer.trainable_variables]
            frozen = [v.value for v in layer.non_trainable_variables]

            def loss(x, trainable):
                y, _ = layer.stateless_call(trainable, frozen, x, training=True, mask=mt)
                return jnp.sum(y * cot), y

            (_, y), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), trainable)
            return [y, gx, *gw]
        if backend == "tensorflow":
            import tensorflow as tf

            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = layer(xt, training=True, mask=mt)
                loss = tf.reduce_sum(y * cot)
            return [y, *tape.gradient(loss, [xt, *layer.trainable_variables])]
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, training=True, mask=mt)
        grads = torch.autograd.grad((y * torch.tensor(cot)).sum(), [xt] + [v.value for v in layer.trainable_variables])
        return [y.detach(), *grads]

    for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), masked_grads(ours), masked_grads(ref)):
        close(a, b, f"masked training {name}", rtol=1e-4, atol=1e-5)
    ours(x, training=True, mask=m)
    ref(x, training=True, mask=m)
    close(ours.moving_mean, ref.moving_mean, "masked moving_mean")
    close(ours.moving_variance, ref.moving_variance, "masked moving_variance")
    # Follows test_input_fully_masked: no position counts: mean and variance 0, output 0.
    from fastbn.keras import BatchNormalization

    norm = BatchNormalization(scale=False, center=False)
    y = norm(np.zeros((4, 5)), mask=np.zeros((4,), np.float32), training=True)
    close(y, np.zeros((4, 5)), "fully masked")
    # Follows test_masked_broadcast_normalization: a (1, 2, 1) mask broadcasts over (1, 2, 3) positions.
    layer = BatchNormalization(axis=-1, momentum=0.0, epsilon=1e-3)
    y = layer(np.ones((1, 2, 3, 4), "float32"), training=True, mask=np.ones((1, 2, 1), "float32"))
    close(y, np.zeros((1, 2, 3, 4)), "broadcast mask output", atol=1e-6)
    close(layer.moving_mean, np.ones(4), "broadcast mask moving_mean")
    close(layer.moving_variance, np.zeros(4), "broadcast mask moving_variance")
    # Follows test_bachnorm_ignore_masked_values: Masking before the layer, fit.
    for mask_value in (0.1,):  # Keras's test takes 0, 0.1 and 1: one suffices for the layer's handling
        padded = np.array([[[1, 5], [2, 5], [mask_value] * 2, [mask_value] * 2]] * 10, "float32")
        inputs = _keras.Input((None, 2))
        masked = _keras.layers.Masking(mask_value=mask_value)(inputs)
        model = _keras.Model(inputs, BatchNormalization(momentum=0.0, name="bn")(masked))
        model.compile("rmsprop", loss="mse")
        model.fit(padded, padded, batch_size=10, epochs=2, verbose=0)
        close(model.get_layer("bn").moving_mean, [1.5, 5.0], f"Masking({mask_value}) moving_mean", atol=1e-5)
        close(model.get_layer("bn").moving_variance, [0.25, 0.0], f"Masking({mask_value}) moving_variance", atol=1e-5)


def renorm():
    """Keras 3's renorm (batch renormalization): output, gradients and all five statistics as Keras's layer."""
    import numpy as np

    rng = np.random.default_rng(23)
    for clipping in (None, {"rmax": 1.5, "rmin": 0.5, "dmax": 0.3}):
        shape = (10, 3)
        ref, ours = pair(24, shape, renorm=True, renorm_clipping=clipping, momentum=0.9, renorm_momentum=0.7)
        assert [w.name for w in ours.weights] == [w.name for w in ref.weights], ours.weights
        for step in range(3):
            x = rng.normal(1.0 + step, 1.0 + step, shape).astype("float32")
            cot = rng.normal(size=shape).astype("float32")
            y_ref, g_ref = value_and_grads(ref, x, cot, True)
            y_ours, g_ours = value_and_grads(ours, x, cot, True)
            close(y_ours, y_ref, f"renorm y clipping={clipping} step {step}", rtol=1e-4, atol=1e-5)
            for a, b in zip(g_ours, g_ref):
                close(a, b, f"renorm gradient clipping={clipping}", rtol=1e-4, atol=1e-5)
            for a, b in zip(ours.weights, ref.weights):
                close(a, b, f"renorm {a.name} step {step}", rtol=1e-5, atol=1e-6)
        close(ours(x), ref(x), "renorm inference")


def ported_layer_tests():
    """Keras's BatchNormalization layer tests, re-written for fastbn's layer (masks in ``mask``)."""
    import numpy as np

    from fastbn.keras import BatchNormalization

    # test_bn_basics: weight counts and regularization losses.
    for kwargs, shape, trainable, losses in (
        ({}, (2, 3), 2, 0),
        ({"center": False, "scale": False}, (2, 3), 0, 0),
        ({"beta_regularizer": "l2", "gamma_regularizer": "l2"}, (2, 4, 4, 3), 2, 2),
    ):
        layer = BatchNormalization(**kwargs)
        y = layer(np.random.default_rng(0).normal(size=shape).astype("float32"), training=True)
        assert tuple(y.shape) == shape
        assert len(layer.trainable_weights) == trainable and len(layer.non_trainable_weights) == 2
        assert len(layer.losses) == losses, layer.losses
        assert layer.supports_masking
    # test_correctness: momentum 0, three training passes normalise; inference after training matches.
    for axis in (-1, 1):
        for shape in ((5, 2, 3), (5, 3, 3, 2)):
            # Keras's test takes the 4 pairs of these initializers; 2 show that the first steps forget them.
            for mean_init, var_init in (("zeros", "ones"), ("ones", "zeros")):
                layer = BatchNormalization(
                    axis=axis, momentum=0, moving_mean_initializer=mean_init, moving_variance_initializer=var_init
                )
                x = np.random.default_rng(1).normal(5.0, 10.0, shape)
                out = x
                for _ in range(3):
                    out = layer(out, training=True)
                along = [1] * len(shape)
                along[axis] = shape[axis]
                out = (np_(out) - np_(layer.beta).reshape(along)) / np_(layer.gamma).reshape(along)
                reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
                close(out.mean(axis=reduce), 0.0, "test_correctness mean", atol=1e-3)
                close(out.std(axis=reduce), 1.0, "test_correctness std", atol=1e-3)
                close(layer.moving_mean, 0.0, "test_correctness moving_mean", atol=1e-3)
                close(layer.moving_variance, 1.0, "test_correctness moving_variance", atol=1e-3)
                assert not np.allclose(np_(layer(x, training=False)), np_(layer(x, training=True)), atol=1e-3)
                training_out = layer(x, training=True)
                close(layer(x, training=False), training_out, "test_correctness inference", atol=1e-5)
                # Masking before the layer changes nothing in inference.
                x[:, 1, :] = 0.0
                masked = _keras.layers.Masking()(x)
                close(layer(masked, training=False), layer(x, training=False), "masked inference")
                # In training the mask that Masking attaches counts: the statistics leave position 1 out.
                # Masking's mask drops the last axis, the feature axis only when axis=-1 (Keras's layer then
                # reads the mask along the feature axis 1, which the layer refuses: see errors()).
                if axis == -1:
                    explicit = layer(x, training=True, mask=np.any(x != 0.0, axis=-1))
                    close(layer(masked, training=True), explicit, "Masking's mask in training")
                    assert not np.allclose(np_(explicit), np_(layer(x, training=True)), atol=1e-3)
    # test_trainable_behavior
    layer = BatchNormalization(axis=-1, momentum=0.8, epsilon=1e-7)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (4, 0, 4)
    x = np.random.default_rng(2).normal(5.0, 10.0, (200, 4, 4, 3))
    close(layer(x, training=True), x, "test_trainable_behavior frozen", atol=1e-4)
    layer.trainable = True
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (4, 2, 2)
    for _ in range(10):
        out = layer(x, training=True)
    out = (np_(out) - np_(layer.beta).reshape(1, 1, 1, 3)) / np_(layer.gamma).reshape(1, 1, 1, 3)
    close(out.mean(axis=(0, 1, 2)), 0.0, "test_trainable_behavior mean", atol=1e-3)
    close(out.std(axis=(0, 1, 2)), 1.0, "test_trainable_behavior std", atol=1e-3)
    # test_large_value_within_autocast_scope: variables keep float32 under a float16 autocast scope.
    layer = BatchNormalization()
    layer.build((1, 4, 4, 3))
    large = _keras.ops.full(layer.moving_variance.shape, 70000)
    with _keras.src.backend.AutocastScope("float16"):
        layer.moving_variance.assign(large)
        close(layer.moving_variance.value, large, "test_large_value_within_autocast_scope")
    # test_renorm_invalid_clipping_keys
    raises(ValueError, ["Received invalid keys"], BatchNormalization, renorm=True, renorm_clipping={"random_key": 1.0})
    raises(ValueError, ["rmax should be"], BatchNormalization, renorm=True, renorm_clipping={"rmax": 0.0, "rmin": 1.0})
    raises(
        ValueError,
        ["dmax should be non-negative"],
        BatchNormalization,
        renorm=True,
        renorm_clipping={"rmax": 1.0, "dmax": -1.0},
    )
    # test_renorm_basics: five non-trainable weights.
    layer = BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0})
    layer(np.random.default_rng(3).normal(size=(2, 4, 4, 3)).astype("float32"), training=True)
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 5)
    # test_renorm_stddev_initializer
    layer = BatchNormalization(renorm=True, moving_variance_initializer=_keras.initializers.Constant(4.0))
    layer.build((None, 5))
    close(layer.moving_stddev, np.full(5, 2.0), "moving_stddev initializer")
    close(layer.renorm_stddev, np.full(5, 2.0), "renorm_stddev initializer")
    # test_renorm_correctness: the hand-computed expectations of Keras's test.
    eps, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    layer = BatchNormalization(epsilon=eps, momentum=momentum, renorm=True, renorm_momentum=renorm_momentum)
    layer.build((None, 3))
    rng = np.random.default_rng(1337)
    moving_mean, moving_var = rng.normal(0, 1, 3), np.abs(rng.normal(1, 0.5, 3))
    renorm_mean, renorm_stddev = rng.normal(0, 1, 3), np.abs(rng.normal(1, 0.5, 3))
    gamma, beta = rng.normal(1, 0.1, 3), rng.normal(0, 0.1, 3)
    for variable, value in (
        (layer.moving_mean, moving_mean),
        (layer.moving_variance, moving_var),
        (layer.moving_stddev, np.sqrt(moving_var)),
        (layer.renorm_mean, renorm_mean),
        (layer.renorm_stddev, renorm_stddev),
        (layer.gamma, gamma),
        (layer.beta, beta),
    ):
        variable.assign(value)
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]], "float32")
    mean, var = x.mean(axis=0), x.var(axis=0)
    stddev = np.sqrt(var + eps)
    r, d = stddev / renorm_stddev, (mean - renorm_mean) / renorm_stddev
    close(layer(x, training=True), ((x - mean) / stddev * r + d) * gamma + beta, "renorm output", atol=1e-5)
    close(layer.renorm_mean, renorm_mean * renorm_momentum + mean * (1 - renorm_momentum), "renorm_mean", atol=1e-5)
    close(layer.renorm_stddev, renorm_stddev * renorm_momentum + stddev * 0.2, "renorm_stddev", atol=1e-5)
    close(layer.moving_mean, moving_mean * momentum + mean * (1 - momentum), "moving_mean", atol=1e-5)
    moving_stddev = np.sqrt(moving_var) * momentum + stddev * (1 - momentum)
    close(layer.moving_stddev, moving_stddev, "moving_stddev", atol=1e-5)
    close(layer.moving_variance, moving_stddev**2 - eps, "moving_variance", atol=1e-5)
    # test_renorm_inference: inference is the same with and without renorm.
    plain, renormed = BatchNormalization(), BatchNormalization(renorm=True)
    plain.build((None, 10))
    renormed.build((None, 10))
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.uniform(0.5, 1.5, 10)
        getattr(plain, name).assign(value)
        getattr(renormed, name).assign(value)
    x = rng.normal(size=(4, 10))
    close(renormed(x, training=False), plain(x, training=False), "renorm inference", atol=1e-5)
    # test_serialization
    layer = BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}, renorm_momentum=0.95
    )
    config = layer.get_config()
    assert BatchNormalization.from_config(config).get_config() == config


def ported_ops_tests():
    """keras/src/ops/nn_test.py's moments and batch_normalization correctness cases, through the layer.

    ``ops.batch_normalization(x, mean, variance, axis, offset, scale, epsilon)``
    is the layer's inference with those moving statistics and weights;
    ``ops.moments(x, axes)`` is what a training step with ``momentum=0``
    leaves as moving statistics (the kept axes are the layer's feature
    axes).  The op clips float16 moments to float16's range; the layer
    computes in float32, as Keras's layer does, so that case compares with
    Keras's layer rather than the op.
    """
    import numpy as np

    from fastbn.keras import BatchNormalization

    ops = _keras.ops
    # test_batch_normalization
    x = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mean, variance = np.array([0.2, 0.3, 0.4]), np.array([4.0, 16.0, 64.0])
    for axis, offset, scale, expected in (
        (-1, np.array([5.0, 10.0, 15.0]), np.array([10.0, 20.0, 30.0]), [[4.5, 9.5, 14.625], [6.0, 11.0, 15.75]]),
        (1, None, None, [[-0.05, -0.025, -0.0125], [0.1, 0.05, 0.025]]),
    ):
        layer = BatchNormalization(axis=axis, epsilon=1e-7, center=offset is not None, scale=scale is not None)
        layer.build(x.shape)
        layer.set_weights([w for w in (scale, offset) if w is not None] + [mean, variance])
        y = layer(x)
        close(y, expected, f"batch_normalization axis={axis}", atol=1e-6)
        close(y, ops.batch_normalization(x, mean, variance, axis, offset, scale, 1e-7), "against ops", atol=1e-6)
    rng = np.random.default_rng(25)
    x = rng.uniform(size=(2, 3, 3, 5))
    params = [rng.uniform(size=5) for _ in range(4)]
    layer = BatchNormalization(axis=3)
    layer.build(x.shape)
    layer.set_weights([params[3], params[2], params[0], params[1]])
    y = layer(x)
    assert tuple(y.shape) == (2, 3, 3, 5)
    close(y, ops.batch_normalization(x, params[0], params[1], 3, params[2], params[3]), "batch_normalization 4-D")

    # test_moments
    def moments_by_layer(x, axes):
        kept = [i for i in range(x.ndim) if i not in axes]
        layer = BatchNormalization(axis=kept, momentum=0.0)
        layer(x, training=True)
        return layer.moving_mean, layer.moving_variance

    x = np.array([0, 1, 2, 3, 4, 100, -200], np.float32).reshape(7, 1)
    mean, var = moments_by_layer(x, [0])
    close(mean, [np.mean(x)], "1-D mean", atol=1e-5)
    close(var, [np.var(x)], "1-D variance", atol=1e-5)
    x = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
    for axes in ([0], [0, 1, 2]):
        mean, var = moments_by_layer(x, axes)
        ref_mean, ref_var = ops.moments(x, axes=axes)
        close(mean, np.mean(x, axis=tuple(axes)), f"moments axes={axes} mean", atol=1e-5)
        close(var, np.var(x, axis=tuple(axes)), f"moments axes={axes} variance", atol=1e-5)
        close(var, ref_var, f"moments axes={axes} against ops", atol=1e-5)
        close(mean, ref_mean, f"moments axes={axes} mean against ops", atol=1e-5)
    x = np.array([-741.0, 353.2, 1099.0, -1807.0, 502.8, -83.4, 333.5, -130.9], np.float16).reshape(8, 1)
    mean, var = moments_by_layer(x, [0])
    ref = _keras.layers.BatchNormalization(momentum=0.0)
    ref(x, training=True)
    close(mean, ref.moving_mean, "float16 moments mean")
    close(var, ref.moving_variance, "float16 moments variance (beyond float16's range)")
    close(var, [np.var(x.astype(np.float64))], "float16 moments variance", rtol=1e-6)


def unsupported_backend_error():
    """On a backend fastbn has no adapter for (Keras's numpy backend), the layer refuses, naming the supported ones."""
    from fastbn.keras import BatchNormalization

    raises(ValueError, ["jax", "torch", "tensorflow", "numpy"], BatchNormalization)


# ---------------------------------------------------------------------------------------------------


def main(backend):
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 check; Keras's floatx stays float32
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = _load()
    assert keras.backend.backend() == backend
    names = UNSUPPORTED_BACKEND_CHECKS if backend == "numpy" else CHECKS
    only = os.environ.get("FASTBN_KERAS_CHECKS")
    if only:
        names = [n for n in names if n in only.split(",")]
    results = {}
    start = time.perf_counter()
    print(f"imports: {start - STARTED:.1f} s", file=sys.stderr)
    for name in names:
        begun = time.perf_counter()
        try:
            keras.utils.set_random_seed(0)
            globals()[name]()
            results[name] = "ok"
        except BaseException:  # every failure is reported, by name
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - begun:.1f} s, cpu {time.process_time():.1f}", file=sys.stderr)
    print("RESULTS: " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
