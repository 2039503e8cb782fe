"""fastbn.flax.BatchNorm against flax.linen.BatchNorm itself: variables, values, gradients and
batch_stats over training steps and in eval, for int/tuple/negative axes, without scale or bias,
on half-precision input; Flax's own linen BatchNorm tests, ported; statistics synchronised over a
vmap axis (even and uneven local batches); and a small CNN trained with each module.

Tolerances (float32 throughout): both modules compute the same formulas in float32 (the
statistics in float64 on fastbn's side, rounded once), so values agree to a few float32 ulps of
O(1) quantities; gradients are sums over at most a few hundred elements, so rtol = atol = 2e-5.
Flax's default variance is E[x^2] - E[x]^2 in float32, which loses ~|mean|^2/var ulps: the
comparisons with Flax's default use data of small mean, the others use_fast_variance=False.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from fastbn.flax import BatchNorm  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def assert_trees_close(got, expected, what, **tol):
    tol = tol or TOL
    _, got_tree = jax.tree_util.tree_flatten(got)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten(expected)
    assert got_tree == expected_tree, f"{what}: {got_tree} != {expected_tree}"
    for path_and_leaf, e in zip(jax.tree_util.tree_flatten_with_path(got)[0], expected_leaves):
        path, g = path_and_leaf
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert g.shape == e.shape and g.dtype == e.dtype, f"{name}: {g.shape} {g.dtype} != {e.shape} {e.dtype}"
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64), err_msg=name, **tol)


def train_step_fn(module, y_weights):
    """jit: (variables, x) -> (y, new batch_stats, gradients of a non-linear loss in params and x)."""

    def loss(params, x, stats):
        y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * y_weights), (y, updates["batch_stats"])

    @jax.jit
    def step(variables, x):
        grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), x, variables["batch_stats"]
        )
        return y, stats, grads

    return step


def eval_fn(module, y_weights):
    def loss(params, x, stats):
        y = module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * y_weights), y

    @jax.jit
    def run(variables, x):
        grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), x, variables["batch_stats"]
        )
        return y, grads

    return run


CASES = [
    # shape, axis, use_bias, use_scale, Flax's use_fast_variance, data mean
    ((6, 5, 3), -1, True, True, True, 0.1),  # Flax's defaults throughout
    ((4, 3, 5), 1, True, False, False, 2.0),
    ((4, 3, 2, 5), (1, 2), False, True, False, 2.0),  # two adjacent feature axes: a reshape
    ((3, 4, 2), (0, 2), False, False, False, 2.0),  # not adjacent: a transpose
    ((2, 3, 4, 3), (-1,), True, True, False, -1.0),
]


@pytest.mark.parametrize("shape, axis, use_bias, use_scale, fast_variance, loc", CASES)
def test_matches_flax_over_training_steps_and_in_eval(shape, axis, use_bias, use_scale, fast_variance, loc):
    rng = np.random.default_rng(0)
    settings = dict(axis=axis, momentum=0.8, epsilon=1e-3, use_bias=use_bias, use_scale=use_scale)
    ours = BatchNorm(use_fast_variance=True, **settings)
    theirs = nn.BatchNorm(use_fast_variance=fast_variance, **settings)
    x0 = jnp.asarray(rng.normal(loc, 2.0, shape).astype(np.float32))
    init_kwargs = dict(use_running_average=False)
    # Random initialisers, so that scale and bias are not 1 and 0; the same key for both.
    if use_scale or use_bias:
        ours = ours.clone(scale_init=nn.initializers.uniform(2.0), bias_init=nn.initializers.normal(1.0))
        theirs = theirs.clone(scale_init=nn.initializers.uniform(2.0), bias_init=nn.initializers.normal(1.0))
    variables = theirs.init(jax.random.key(1), x0, **init_kwargs)
    assert_trees_close(ours.init(jax.random.key(1), x0, **init_kwargs), variables, "init", rtol=0, atol=0)
    y_weights = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    our_step = train_step_fn(ours.clone(use_running_average=False), y_weights)
    their_step = train_step_fn(theirs.clone(use_running_average=False), y_weights)
    # Flax's variables load into fastbn's module: each step starts both from Flax's state.
    our_vars = their_vars = variables
    for step in range(3):
        x = jnp.asarray(rng.normal(loc, 2.0, shape).astype(np.float32))
        y, stats, grads = our_step(our_vars, x)
        y_ref, stats_ref, grads_ref = their_step(their_vars, x)
        assert y.dtype == y_ref.dtype == jnp.float32
        assert_trees_close(y, y_ref, f"step {step} y")
        assert_trees_close(stats, stats_ref, f"step {step} batch_stats")
        assert_trees_close(grads, grads_ref, f"step {step} gradients")
        our_vars = {**our_vars, "batch_stats": stats}
        their_vars = {**their_vars, "batch_stats": stats_ref}
    # Eval: use_running_average as the __call__ argument (the attribute is None).
    y, grads = eval_fn(ours, y_weights)(our_vars, x)
    y_ref, grads_ref = eval_fn(theirs, y_weights)(their_vars, x)
    assert_trees_close(y, y_ref, "eval y")
    assert_trees_close(grads, grads_ref, "eval gradients")
    # And back: fastbn's state in Flax's module gives fastbn's eval output.
    y_back, _ = eval_fn(theirs, y_weights)(our_vars, x)
    assert_trees_close(y_back, y, "eval y, fastbn's state in Flax's module")


@pytest.mark.parametrize("dtype, module_dtype", [(jnp.float16, None), (jnp.bfloat16, None), (jnp.bfloat16, "same")])
def test_half_precision_input_matches_flax(dtype, module_dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0.5, 2.0, (8, 6)).astype(np.float32)).astype(dtype)
    kwargs = dict(use_running_average=False, momentum=0.9, use_fast_variance=False)
    if module_dtype == "same":
        kwargs["dtype"] = dtype
    ours, theirs = BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    variables = theirs.init(jax.random.key(0), x)
    y, stats = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, stats_ref = theirs.apply(variables, x, mutable=["batch_stats"])
    # Flax's output dtype: the promotion of x and float32 parameters, unless dtype is given.
    assert y.dtype == y_ref.dtype == (dtype if module_dtype else jnp.float32)
    # Statistics of the (exact) float32 values of x: float32 agreement.  The output: one rounding
    # to y's dtype on each side, so up to one of its ulps apart (2^-7 relative for bfloat16).
    assert_trees_close(stats, stats_ref, "batch_stats")
    ulp = float(jnp.finfo(y.dtype).eps)
    np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(y_ref, np.float64), rtol=ulp, atol=ulp * 4)


@pytest.mark.parametrize("test_mask", [False, True])
def test_ported_flax_batch_norm(test_mask):
    # Follows flax tests/linen/linen_test.py NormalizationTest.test_batch_norm: normalised output
    # of zero mean and unit variance over the (masked) batch, and the EMA after one step.
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2))
    if test_mask:
        m = jax.random.randint(key2, (4, 3, 1), minval=0, maxval=2).astype(jnp.bool_)
        m = m.at[0, :2].set(True)
        x = jnp.where(m, x, jnp.nan)  # masked-out values must not matter
    else:
        m = None
    module = BatchNorm(momentum=0.9, use_running_average=False)
    y, variables = module.init_with_output(key3, x, mask=m)
    np.testing.assert_allclose(y.mean((0, 1), where=m), np.zeros(2), atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1), where=m), np.ones(2), rtol=1e-4)
    # init leaves the statistics alone, as Flax's does.
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["mean"]), np.zeros(2))
    _, updated = module.apply(variables, x, mutable=["batch_stats"], mask=m)
    ema = updated["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)
    # And against Flax's module on the same input and mask.
    _, flax_updated = nn.BatchNorm(momentum=0.9, use_running_average=False).apply(
        variables, x, mutable=["batch_stats"], mask=m
    )
    assert_trees_close(updated, flax_updated, "batch_stats", rtol=1e-5, atol=1e-6)


def test_ported_flax_batch_norm_multi_init():
    # Follows flax tests/linen/linen_test.py NormalizationTest.test_batch_norm_multi_init: with
    # axis_name set, init works outside any mapped axis (init does not synchronise), and a
    # module applied twice normalises the already normalised output to (nearly) itself.
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = BatchNorm(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), variables = Twice().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)
    assert set(variables) == {"params", "batch_stats"}


def test_axis_name_under_vmap_matches_one_batch():
    # D members of a vmap axis, each with its own local batch: the synchronised statistics,
    # outputs and gradients are those of one module on the concatenated batch.
    rng = np.random.default_rng(2)
    members, local, channels = 3, 4, 5
    x = jnp.asarray(rng.normal(1.0, 2.0, (members, local, channels)).astype(np.float32))
    y_weights = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    synced = BatchNorm(use_running_average=False, axis_name="batch", momentum=0.7)
    single = BatchNorm(use_running_average=False, momentum=0.7)
    variables = nn.BatchNorm(scale_init=nn.initializers.uniform(2.0)).init(
        jax.random.key(3), x[0], use_running_average=False
    )

    def member_loss(params, xi, wi):
        y, updates = synced.apply({**variables, "params": params}, xi, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * wi), (y, updates["batch_stats"])

    def synced_loss(params, x):
        losses, (y, stats) = jax.vmap(member_loss, in_axes=(None, 0, 0), axis_name="batch")(params, x, y_weights)
        return jnp.sum(losses), (y, stats)

    (grads, (y, stats)) = jax.jit(jax.grad(synced_loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

    def single_loss(params, x):
        flat = x.reshape(members * local, channels)
        y, updates = single.apply({**variables, "params": params}, flat, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * y_weights.reshape(flat.shape)), (y, updates["batch_stats"])

    (grads_ref, (y_ref, stats_ref)) = jax.grad(single_loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    assert_trees_close(y.reshape(y_ref.shape), y_ref, "y")
    for i in range(members):  # every member holds the same synchronised statistics
        assert_trees_close({k: v[i] for k, v in stats.items()}, stats_ref, f"member {i} stats")
    # Gradients flow through lax.all_gather and the merge: the same as on one batch.
    assert_trees_close(grads, grads_ref, "gradients")


def test_axis_name_with_uneven_local_batches_is_exact():
    # Masks give members different counts (2, 5 and 11 of 12 rows): fastbn merges the gathered
    # (count, mean, var) exactly, so the statistics are those of the unmasked rows of the whole
    # batch.  Flax's module averages the members' E[x] and E[x^2] with equal weights instead.
    rng = np.random.default_rng(4)
    members, local, channels = 3, 12, 2
    x = jnp.asarray(rng.normal(0.0, 1.0, (members, local, channels)).astype(np.float32))
    x = x + jnp.asarray([0.0, 3.0, -2.0], jnp.float32)[:, None, None]  # members differ in mean
    counts = (2, 5, 11)
    mask = jnp.asarray(np.arange(local)[None, :] < np.asarray(counts)[:, None])[..., None]
    variables = nn.BatchNorm().init(jax.random.key(0), x[0], use_running_average=False)

    def run(module):
        def member(xi, mi):
            y, updates = module.apply(variables, xi, mutable=["batch_stats"], mask=mi)
            return y, updates["batch_stats"]

        return jax.vmap(member, axis_name="batch")(x, mask)

    y, stats = run(BatchNorm(use_running_average=False, axis_name="batch", momentum=0.0))
    rows = np.concatenate([np.asarray(x[i, :n]) for i, n in enumerate(counts)]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(stats["mean"][0]), rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"][0]), rows.var(0), rtol=1e-5, atol=1e-6)
    expected_y = (np.asarray(x, np.float64) - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y), expected_y, rtol=1e-4, atol=1e-4)
    _, flax_stats = run(nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.0))
    assert np.max(np.abs(np.asarray(flax_stats["mean"][0]) - rows.mean(0))) > 0.1


class CNN(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train):
        # No conv bias: batch norm cancels it, so its gradient is rounding noise, which adam
        # would scale up to full-size steps in either model.
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


def train(norm, images, labels, steps):
    model = CNN(norm)
    variables = CNN(nn.BatchNorm).init(jax.random.key(0), images, train=False)  # Flax's init for both
    optimizer = optax.adam(1e-2)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)

    def loss_fn(params, stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    for _ in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    evaluated = model.apply({"params": params, "batch_stats": stats}, images, train=False)
    return np.asarray(losses), params, stats, evaluated


def test_cnn_trains_as_with_flax_batch_norm():
    # conv -> BatchNorm -> relu -> pool -> dense, adam, 4 steps on random data, from the same init.
    # Tolerance: the two modules' outputs differ by float32 rounding (a few 1e-8 to 1e-7 on values
    # of O(1)), and so do the gradients; adam divides each update by the root of the gradient's
    # second moment, which can enlarge a relative difference in a small gradient, so parameters,
    # statistics and logits get 1e-5 (about 80 float32 ulps at 1.0; the observed differences are
    # ~1.3e-7, one step changes parameters by ~1e-2), the losses 1e-6.
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(0.0, 1.0, (8, 6, 6, 2)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 3, 8))
    ours = train(BatchNorm, images, labels, 4)
    theirs = train(nn.BatchNorm, images, labels, 4)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    assert ours[0][-1] < ours[0][0]  # it does learn
    for got, expected, what in zip(ours[1:], theirs[1:], ("params", "batch_stats", "eval logits")):
        assert_trees_close(got, expected, what, rtol=1e-5, atol=1e-5)


def test_errors():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="use_running_average"):  # Flax's merge_param: given twice
        BatchNorm(use_running_average=True).init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(ValueError, match=r"^axis: 2 is out of range"):
        BatchNorm(axis=2).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"^axis: \(0, 1\) leaves no axis"):
        BatchNorm(axis=(0, 1)).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"^momentum: "):
        BatchNorm(momentum=1.5).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(TypeError, match=r"^x: expected dtype"):
        BatchNorm().init(jax.random.key(0), x.astype(jnp.int32), use_running_average=False)
    with pytest.raises(ValueError, match=r"^force_float32_reductions: "):
        BatchNorm(force_float32_reductions=False).init(jax.random.key(0), x, use_running_average=False)
    # One value per feature in training: fastbn follows PyTorch and refuses it.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm().init(jax.random.key(0), x[:1], use_running_average=False)


PMAP_SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from fastbn.flax import BatchNorm

assert jax.device_count() == 3
rng = np.random.default_rng(6)
x = jnp.asarray(rng.normal(1.0, 2.0, (3, 4, 5)).astype(np.float32))
w = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
variables = nn.BatchNorm(scale_init=nn.initializers.uniform(2.0)).init(
    jax.random.key(0), x[0], use_running_average=False
)

def loss(module, params, x, w):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * w), updates["batch_stats"]

synced = BatchNorm(use_running_average=False, axis_name="devices")
grad = jax.grad(lambda p, x, w: loss(synced, p, x, w), argnums=(0, 1), has_aux=True)
(g_params, g_x), stats = jax.pmap(grad, axis_name="devices", in_axes=(None, 0, 0))(variables["params"], x, w)
single = BatchNorm(use_running_average=False)
(r_params, r_x), r_stats = jax.grad(lambda p, x, w: loss(single, p, x, w), argnums=(0, 1), has_aux=True)(
    variables["params"], x.reshape(12, 5), w.reshape(12, 5)
)
def err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
# Each device's parameter gradient is its own batch's share: their sum is the whole's.
print(json.dumps({
    "x": err(g_x.reshape(12, 5), r_x),
    "scale": err(g_params["scale"].sum(0), r_params["scale"]),
    "bias": err(g_params["bias"].sum(0), r_params["bias"]),
    "mean": max(err(stats["mean"][i], r_stats["mean"]) for i in range(3)),
    "var": max(err(stats["var"][i], r_stats["var"]) for i in range(3)),
}))
"""


def test_axis_name_under_pmap_on_three_cpu_devices():
    # pmap over three host devices (XLA_FLAGS, so in a fresh interpreter): the same as one module
    # on the concatenated batch, in gradients (x, scale, bias) and batch_stats.
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(errors) == {"x", "scale", "bias", "mean", "var"}
    assert max(errors.values()) < 2e-5, errors


DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: d.__name__)
def test_batch_stats_keep_flax_dtypes_and_a_scan_carry_holds(x_dtype):
    """batch_stats take Flax's statistics dtype (the input's or ``dtype``, at least float32), not the output's:
    float32 input with float64 parameters turned them float64, which breaks a lax.scan carry."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(7).normal(1.0, 2.0, (8, 3))).astype(x_dtype)
        for param_dtype in (jnp.float32, jnp.float64):
            for dtype in (None, jnp.float16, jnp.float32, jnp.float64):
                kwargs = dict(use_running_average=False, param_dtype=param_dtype, dtype=dtype, use_fast_variance=False)
                variables = nn.BatchNorm(**kwargs).init(jax.random.key(0), x)
                y, stats = BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
                y_ref, stats_ref = nn.BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
                what = f"param_dtype={param_dtype.__name__}, dtype={getattr(dtype, '__name__', None)}"
                assert y.dtype == y_ref.dtype, what
                for name in ("mean", "var"):
                    got, expected = stats["batch_stats"][name], stats_ref["batch_stats"][name]
                    assert got.dtype == expected.dtype, f"{what}: batch_stats[{name!r}]"
        module = BatchNorm(use_running_average=False, param_dtype=jnp.float64)
        variables = module.init(jax.random.key(0), x)

        def step(stats, xs):
            _, updates = module.apply({**variables, "batch_stats": stats}, xs, mutable=["batch_stats"])
            return updates["batch_stats"], None

        if x_dtype != jnp.float64:  # float64 input: Flax's own batch_stats turn float64 after one step too
            final, _ = jax.lax.scan(step, variables["batch_stats"], jnp.stack([x, x + 1]))
            assert final["mean"].dtype == final["var"].dtype == jnp.float32


def test_numpy_jax_and_traced_scalar_options_are_taken_as_flax_takes_them():
    x = jnp.asarray(np.random.default_rng(8).normal(0.0, 2.0, (6, 4)).astype(np.float32))
    variables = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    for momentum, epsilon in [(np.float32(0.8), np.float32(1e-3)), (jnp.float32(0.8), jnp.float32(1e-3))]:
        kwargs = dict(use_running_average=False, momentum=momentum, epsilon=epsilon, use_fast_variance=False)
        y, stats = BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
        y_ref, stats_ref = nn.BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
        assert_trees_close((y, stats), (y_ref, stats_ref), f"momentum {type(momentum).__name__}")

    @jax.jit
    def traced(m):  # momentum is only used in the jax.numpy update, so a traced one works, as in Flax
        return BatchNorm(use_running_average=False, momentum=m).apply(variables, x, mutable=["batch_stats"])[1]

    expected = nn.BatchNorm(use_running_average=False, momentum=0.8).apply(variables, x, mutable=["batch_stats"])[1]
    assert_trees_close(traced(0.8), expected, "traced momentum")


def test_batch_stats_of_the_wrong_shape_are_named():
    x = jnp.ones((4, 3))
    variables = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    bad = {**variables, "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(3)}}
    for use_running_average in (False, True):
        with pytest.raises(ValueError, match=r"^batch_stats\['mean'\]: expected the feature shape \(3,\), got \(4,\)"):
            BatchNorm(use_running_average=use_running_average).apply(bad, x, mutable=["batch_stats"])


def test_a_biased_variance_within_range_is_finite_where_the_unbiased_one_overflows():
    """float32, n = 2: the biased variance 2.25e38 is finite; the unbiased one (twice it) is not."""
    x = jnp.asarray(np.array([[1.5e19, 1.0], [-1.5e19, 2.0]], np.float32))
    variables = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    module = BatchNorm(use_running_average=False, momentum=0.0)

    def run(variables, x):
        return module.apply(variables, x, mutable=["batch_stats"])

    for call in (run, jax.jit(run)):
        y, stats = call(variables, x)
        np.testing.assert_allclose(np.asarray(stats["batch_stats"]["var"]), [2.25e38, 0.25], rtol=2e-7)
        second = 0.5 / np.sqrt(0.25 + 1e-5)  # eps is negligible beside 2.25e38, not beside 0.25
        np.testing.assert_allclose(np.asarray(y), [[1.0, -second], [-1.0, second]], rtol=1e-6)
