"""HSIC as an OptEq prior (the paper's Tables 4-5): its gradient, its effect, training, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

# The independent numpy references, shared with the other prior tests (same folder).
from test_opteq_priors import finite_difference_gradient, numpy_hsic_sum

from keras_deq.layers import opteq

F64 = tf.float64


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def dependent_inputs(rng, batch=16, features=4):
    """Inputs whose features 0 and 1 are strongly (nonlinearly) dependent."""
    x = rng.normal(size=(batch, features))
    x[:, 1] = np.sin(2 * x[:, 0]) + 0.1 * x[:, 1]
    return x


def hsic_block(**kwargs):
    """A float64 dense block on 4 features, one unit of 8, started large (orthogonal)."""
    options = {
        "alpha": 0.8,
        "max_norm": 0.9,
        "unroll_steps": 60,
        "kernel_initializer": "orthogonal",
        "prior_sigma": 0.5,
        **kwargs,
    }
    block = opteq.OptEqBlock([8], dtype="float64", **options)
    block.build((None, 4))
    return block


# ------------------------------------------------------------------ the gradient step
@pytest.mark.parametrize("shape", [(9, 3), (2, 3, 3, 2)])
def test_hsic_prior_gradient_and_step_match_finite_differences(shape):
    """`grad R` of the HSIC prior is the gradient of the pairwise HSIC sum, and its
    structural operator is the gradient step `z - gamma grad R(z)` (Theorem 4's form)."""
    z = np.random.default_rng(1).normal(size=shape)
    sigma, gamma = 0.8, 0.3
    prior = opteq.FeaturePrior("hsic", strength=gamma, sigma=sigma)
    numeric = finite_difference_gradient(lambda v: numpy_hsic_sum(v, sigma), z)
    assert np.max(np.abs(numeric)) > 1e-3  # a test with power
    z_t = tf.constant(z, F64)
    np.testing.assert_allclose(prior.gradient(z_t).numpy(), numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        opteq.hsic_gradient(z_t, sigma).numpy(), numeric, rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(prior.step(z_t).numpy(), z - gamma * numeric, rtol=1e-6, atol=1e-9)
    assert float(prior.value(z_t)) == pytest.approx(numpy_hsic_sum(z, sigma), rel=1e-12)
    # A small step lowers the HSIC sum.
    small = opteq.FeaturePrior("hsic", strength=0.05, sigma=sigma).step(z_t).numpy()
    assert numpy_hsic_sum(small, sigma) < numpy_hsic_sum(z, sigma)


@pytest.mark.parametrize(
    ("shape", "dtype", "sigma"),
    [
        ((7, 3), "float32", 1.3),
        ((7, 3), "float64", 0.2),
        ((3, 2, 2, 3), "float32", 0.7),
        ((5, 3), "float32", 1e-30),  # kernels in float64
        ((5, 3), "float64", 1e-200),  # kernels `d == 0`
        ((5, 3), "float64", float("inf")),
    ],
)
def test_hsic_gradient_matches_autodiff_of_hsic_for_any_sigma(shape, dtype, sigma):
    z = tf.constant(np.random.default_rng(2).normal(size=shape), dtype)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = opteq.hsic(z, sigma)
    expected = tape.gradient(value, z).numpy()
    closed = opteq.hsic_gradient(z, sigma).numpy()
    assert closed.dtype == expected.dtype and np.all(np.isfinite(closed))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(closed, expected, rtol=tol, atol=tol * 1e-2)


def test_hsic_of_one_sample_is_zero_with_a_zero_gradient():
    """One sample has no dependence: 0, not `0 / 0` (the estimator's `(B - 1)^2`)."""
    z = tf.constant([[0.3, -1.2, 2.0]], F64)
    assert float(opteq.hsic(z)) == 0.0
    np.testing.assert_array_equal(opteq.hsic_gradient(z).numpy(), np.zeros((1, 3)))
    step = opteq.FeaturePrior("hsic", strength=0.5).step(z)
    np.testing.assert_array_equal(step.numpy(), z.numpy())


def test_hsic_gradient_is_differentiable_again():
    """Training through a structural HSIC step differentiates `hsic_gradient`."""
    z = np.random.default_rng(3).normal(size=(6, 3))
    probe = np.random.default_rng(4).normal(size=(6, 3))

    def scalar(v):
        return tf.reduce_sum(opteq.hsic_gradient(v, 0.9) * probe)

    variable = tf.constant(z, F64)
    with tf.GradientTape() as tape:
        tape.watch(variable)
        value = scalar(variable)
    numeric = finite_difference_gradient(lambda v: float(scalar(tf.constant(v, F64))), z)
    np.testing.assert_allclose(tape.gradient(value, variable).numpy(), numeric, atol=1e-8)


@pytest.mark.parametrize(("dtype", "sigma"), [("float32", 1e-19), ("float32", 1e-30)])
def test_second_derivative_of_hsic_stays_finite_for_a_tiny_bandwidth(dtype, sigma):
    """The diagonal terms of the second derivative (~1 / sigma^2, cancelling) are left out."""
    z = tf.constant(np.random.default_rng(5).normal(size=(6, 3)), dtype)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = tf.reduce_sum(tf.sin(opteq.hsic_gradient(z, sigma)))
    assert np.all(np.isfinite(tape.gradient(value, z).numpy()))


# ------------------------------------------------------------------ the prior on the equilibrium
@pytest.mark.parametrize(
    "options",
    [
        {"prior_mode": "structural"},
        {"prior_mode": "structural", "training_mode": "implicit", "solver": "anderson"},
        {"prior_mode": "sam"},
    ],
    ids=["structural", "structural-implicit", "sam"],
)
def test_hsic_prior_lowers_the_hsic_of_the_equilibrium(options):
    """Same weights, same inputs: the HSIC prior's equilibrium has a lower HSIC sum."""
    x = tf.constant(dependent_inputs(np.random.default_rng(5)))
    plain = hsic_block()
    z_plain = plain(x)
    implicit = {"tol": 1e-10, "max_iter": 200} if "training_mode" in options else {}
    block = hsic_block(prior="hsic", prior_strength=2.0, **options, **implicit)
    block.cell.set_weights(plain.cell.get_weights())
    z = block(x)
    before, after = float(opteq.hsic(z_plain, 0.5)), float(opteq.hsic(z, 0.5))
    assert after < 0.9 * before, (before, after)
    if options["prior_mode"] == "structural":
        # The map is z -> T(z - gamma grad R(z), x), grad R the HSIC sum's gradient,
        # and z is its fixed point.
        numeric = finite_difference_gradient(lambda v: numpy_hsic_sum(v, 0.5), z.numpy())
        moved = tf.constant(z.numpy() - 2.0 * numeric)
        np.testing.assert_allclose(
            block.map(x)(z).numpy(), plain.map(x)(moved).numpy(), rtol=0, atol=1e-8
        )
        assert float(tf.reduce_max(block.relative_residual(x, z))) < 1e-4


def test_block_with_hsic_prior_gradient_matches_finite_differences():
    """The unrolled structural block's input gradient (through the HSIC step)."""
    rng = np.random.default_rng(6)
    x = dependent_inputs(rng, batch=6)
    probe = rng.normal(size=x.shape)
    block = hsic_block(prior="hsic", prior_strength=0.5, unroll_steps=15)

    @tf.function
    def loss(v):
        return tf.reduce_sum(block(v) * probe)

    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        value = loss(x_t)
    grad = tape.gradient(value, x_t).numpy()
    numeric = finite_difference_gradient(lambda v: float(loss(tf.constant(v))), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{}, {"prior_mode": "sam"}, {"training_mode": "implicit"}])
def test_model_with_hsic_prior_trains(options):
    rng = np.random.default_rng(7)
    x = dependent_inputs(rng, batch=64).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            opteq.OptEqBlock(
                [8, 8],
                prior="hsic",
                prior_strength=0.1,
                unroll_steps=8,
                deq_options={"on_failure": "ignore"},
                name="opteq",
                **options,
            ),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = model.trainable_weights
    assert all(np.all(np.isfinite(w.numpy())) for w in after)
    assert all(np.any(w.numpy() != b) for w, b in zip(after, before, strict=True))


def test_sam_block_with_hsic_prior_compiles_with_xla():
    x = tf.constant(dependent_inputs(np.random.default_rng(8), batch=8))
    block = hsic_block(prior="hsic", prior_mode="sam", unroll_steps=6)

    def loss_and_gradients(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            loss = tf.reduce_sum(block(v, training=True) ** 2)
        return [loss, *tape.gradient(loss, [v, *block.trainable_variables])]

    eager = loss_and_gradients(x)
    xla = tf.function(loss_and_gradients, jit_compile=True)(x)
    for a, b in zip(eager, xla, strict=True):
        assert np.all(np.isfinite(a.numpy())) and np.any(a.numpy() != 0)
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ configuration
def test_hsic_prior_config_round_trips_and_saves(tmp_path):
    prior = opteq.FeaturePrior("hsic", strength=0.3, sigma=0.7)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(prior))
    assert clone.get_config() == prior.get_config() and clone.sigma == 0.7
    # A config saved before `sigma` existed still loads (the default bandwidth).
    assert (
        opteq.FeaturePrior.from_config({"name": "l2", "strength": 0.1, "epsilon": 1.0}).sigma == 1
    )

    for kwargs in ({"prior_mode": "structural"}, {"prior_mode": "sam"}):
        block = opteq.OptEqBlock([6], prior="hsic", prior_sigma=0.7, unroll_steps=4, **kwargs)
        assert block.get_config()["prior_sigma"] == 0.7
        clone = opteq.OptEqBlock.from_config(block.get_config())
        assert clone.get_config() == block.get_config()
        prior = clone.cell.prior if kwargs["prior_mode"] == "structural" else clone.sam_prior
        assert prior.name == "hsic" and prior.sigma == 0.7
        model = keras.Sequential([keras.Input((4,)), block])
        x = np.random.default_rng(9).normal(size=(5, 4)).astype("float32")
        path = tmp_path / f"hsic_{kwargs['prior_mode']}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    cell = opteq.OptEqCell([3], prior="hsic", prior_sigma=2.0)
    cell_clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cell))
    assert cell_clone.get_config() == cell.get_config() and cell_clone.prior.sigma == 2.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), "1", True])
def test_bad_hsic_bandwidths_are_refused_naming_the_argument(sigma):
    with pytest.raises(ValueError, match="prior_sigma"):
        opteq.OptEqBlock([4], prior="hsic", prior_sigma=sigma)
    with pytest.raises(ValueError, match="prior_sigma"):
        opteq.OptEqCell([4], prior="hsic", prior_sigma=sigma)
    with pytest.raises(ValueError, match="sigma"):
        opteq.FeaturePrior("hsic", sigma=sigma)
