"""`OptEqBlock`: unrolled and implicit training, priors (HSIC included), config and saving."""

import keras
import numpy as np
import pytest
from feature_references import finite_difference_gradient, layer_gradients, numpy_hsic_sum
from keras import ops
from opteq_references import compiled as backend_compiled
from opteq_references import numpy_unit

from keras_deq.features import decorrelation, hsic
from keras_deq.layers.opteq_block import OptEqBlock
from keras_deq.layers.opteq_priors import PRIORS, FeaturePrior
from keras_deq.layers.opteq_sam import sam_iteration
from keras_deq.regularizers import DecorrelationRegularizer


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def dense_block(units=(5, 7), **kwargs):
    block = OptEqBlock(list(units), dtype="float64", **kwargs)
    block.build((None, 4))
    return block


def copy_cell_weights(source, target):
    target.cell.set_weights(source.cell.get_weights())


def compiled(block, x):
    """`block(x)`, compiled (eager while-loops run their body in Python)."""
    return np.asarray(backend_compiled(lambda v: block(v))(ops.convert_to_tensor(x)))


def block_gradients(block, x, probe):
    grads = layer_gradients(
        block, x, lambda out: ops.sum(out * probe), block.cell.trainable_variables
    )
    return np.concatenate([np.asarray(g).ravel() for g in grads])


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
    block = OptEqBlock([8], dtype="float64", **options)
    block.build((None, 4))
    return block


@pytest.mark.float64
# ------------------------------------------------------------------ the iteration
def test_block_starts_at_the_input_and_runs_k_steps():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4))
    for steps in (1, 2, 3):
        block = dense_block(units=(6,), alpha=0.7, unroll_steps=steps)
        weights = [v.numpy() for v in block.cell.unit_layers[0].weights]
        z = x
        for _ in range(steps):
            z = numpy_unit(z, x, *weights, alpha=0.7)
        np.testing.assert_allclose(np.asarray(block(x)), z, rtol=1e-12)


@pytest.mark.float64
def test_implicit_and_unrolled_blocks_reach_the_same_equilibrium():
    x = np.random.default_rng(9).normal(size=(5, 4))
    unrolled = dense_block(unroll_steps=300)
    implicit = dense_block(training_mode="implicit", tol=1e-11, max_iter=100)
    copy_cell_weights(unrolled, implicit)
    z = compiled(implicit, x)
    np.testing.assert_allclose(z, compiled(unrolled, x), atol=1e-9)
    assert float(np.max(implicit.relative_residual(x))) < 1e-9


@pytest.mark.float64
def test_unrolled_gradient_approaches_the_implicit_gradient_as_k_grows():
    rng = np.random.default_rng(10)
    x, probe = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    init = keras.initializers.Orthogonal(gain=0.95, seed=1)
    implicit = dense_block(
        training_mode="implicit", tol=1e-12, max_iter=200, kernel_initializer=init
    )
    reference = block_gradients(implicit, x, probe)
    errors = []
    for steps in (5, 10, 20, 40, 80, 160):
        unrolled = dense_block(unroll_steps=steps, kernel_initializer=init)
        copy_cell_weights(implicit, unrolled)
        grad = block_gradients(unrolled, x, probe)
        errors.append(np.linalg.norm(grad - reference) / np.linalg.norm(reference))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > 1e-2 and errors[-1] < 1e-7


@pytest.mark.float64
@pytest.mark.tensorflow_only("XLA through tf.function(jit_compile=True)")
def test_unrolled_sam_block_and_its_gradient_compile_with_xla():
    import tensorflow as tf  # noqa: PLC0415

    block = dense_block(prior="decorrelation", prior_mode="sam", unroll_steps=6)
    x = tf.constant(np.random.default_rng(19).normal(size=(5, 4)))

    def loss_and_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(block(x) ** 2)
        return [loss, *tape.gradient(loss, [x, *block.trainable_variables])]

    eager = loss_and_gradients(x)
    xla = tf.function(loss_and_gradients, jit_compile=True)(x)
    for a, b in zip(eager, xla, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.float64
@pytest.mark.tensorflow_only("a GradientTape training loop on the layer's variables")
def test_learnable_alpha_starts_at_alpha_stays_in_0_1_and_trains():
    import tensorflow as tf  # noqa: PLC0415

    block = dense_block(units=(6, 6, 6), learnable_alpha=True)
    np.testing.assert_allclose([float(a) for a in block.cell.alphas()], [0.8] * 3, rtol=1e-6)
    rng = np.random.default_rng(11)
    x, target = tf.constant(rng.normal(size=(8, 4))), tf.constant(rng.normal(size=(8, 4)))
    optimizer = keras.optimizers.SGD(0.02)
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((block(x) - target) ** 2)
        grads = tape.gradient(loss, block.trainable_variables)
        optimizer.apply_gradients(zip(grads, block.trainable_variables, strict=True))
    alphas = [float(a) for a in block.cell.alphas()]
    assert all(0 < a < 1 for a in alphas) and any(abs(a - 0.8) > 1e-4 for a in alphas)
    assert sum(int(np.prod(v.shape)) for v in block.trainable_weights) == 3 * (4 * 6 * 2 + 6 + 1)


@pytest.mark.float64
# ------------------------------------------------------------------ priors
def test_structural_prior_solves_t_of_t_r():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 4))
    block = dense_block(units=(6,), prior="l2", prior_strength=0.5, unroll_steps=300)
    weights = [v.numpy() for v in block.cell.unit_layers[0].weights]
    z = compiled(block, x)
    np.testing.assert_allclose(numpy_unit(z / 1.5, x, *weights, alpha=0.8), z, atol=1e-12)
    plain = dense_block(units=(6,), unroll_steps=300)
    copy_cell_weights(block, plain)
    assert np.linalg.norm(z) < np.linalg.norm(compiled(plain, x))  # feature decay


@pytest.mark.float64
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("mode", ["structural", "sam"])
def test_every_prior_and_mode_gives_finite_outputs_and_gradients(prior, mode):
    block = dense_block(prior=prior, prior_mode=mode, unroll_steps=5, prior_strength=0.05)
    grads = block_gradients(block, np.random.default_rng(13).normal(size=(6, 4)), 1.0)
    assert np.all(np.isfinite(grads)) and np.linalg.norm(grads) > 0


@pytest.mark.float64
def test_sam_block_runs_the_sam_iteration_from_the_input():
    x = ops.convert_to_tensor(np.random.default_rng(14).normal(size=(6, 4)))
    block = dense_block(
        prior="decorrelation",
        prior_mode="sam",
        prior_strength=0.2,
        unroll_steps=8,
        sam_rho=0.3,
        sam_c=0.25,
    )
    prior = FeaturePrior("decorrelation", 0.2)
    manual = sam_iteration(block.map(x), x, 8, prior.gradient, rho=0.3, c=0.25, gamma=0.2)
    np.testing.assert_allclose(np.asarray(block(x)), np.asarray(manual), rtol=1e-12)
    plain = dense_block(unroll_steps=8)
    copy_cell_weights(block, plain)
    assert np.max(np.abs(np.asarray(plain(x)) - np.asarray(manual))) > 1e-3


@pytest.mark.float64
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
    x = ops.convert_to_tensor(dependent_inputs(np.random.default_rng(5)))
    plain = hsic_block()
    z_plain = plain(x)
    implicit = {"tol": 1e-10, "max_iter": 200} if "training_mode" in options else {}
    block = hsic_block(prior="hsic", prior_strength=2.0, **options, **implicit)
    block.cell.set_weights(plain.cell.get_weights())
    z = block(x)
    before, after = float(hsic(z_plain, 0.5)), float(hsic(z, 0.5))
    assert after < 0.9 * before, (before, after)
    if options["prior_mode"] == "structural":
        # The map is z -> T(z - gamma grad R(z), x), grad R the HSIC sum's gradient,
        # and z is its fixed point.
        numeric = finite_difference_gradient(lambda v: numpy_hsic_sum(v, 0.5), np.asarray(z))
        moved = ops.convert_to_tensor(np.asarray(z) - 2.0 * numeric)
        np.testing.assert_allclose(
            np.asarray(block.map(x)(z)), np.asarray(plain.map(x)(moved)), rtol=0, atol=1e-8
        )
        assert float(np.max(block.relative_residual(x, z))) < 1e-4


@pytest.mark.float64
def test_block_with_hsic_prior_gradient_matches_finite_differences():
    """The unrolled structural block's input gradient (through the HSIC step)."""
    rng = np.random.default_rng(6)
    x = dependent_inputs(rng, batch=6)
    probe = rng.normal(size=x.shape)
    block = hsic_block(prior="hsic", prior_strength=0.5, unroll_steps=15)

    def loss(v):
        return ops.sum(block(v) * probe)

    grad = np.asarray(layer_gradients(block, x, lambda out: ops.sum(out * probe), [])[0])
    loss = backend_compiled(loss)
    numeric = finite_difference_gradient(lambda v: float(loss(ops.convert_to_tensor(v))), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{}, {"prior_mode": "sam"}, {"training_mode": "implicit"}])
def test_model_with_hsic_prior_trains(options):
    rng = np.random.default_rng(7)
    x = dependent_inputs(rng, batch=64).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            OptEqBlock(
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


@pytest.mark.float64
@pytest.mark.tensorflow_only("XLA through tf.function(jit_compile=True)")
def test_sam_block_with_hsic_prior_compiles_with_xla():
    import tensorflow as tf  # noqa: PLC0415

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


# ------------------------------------------------------------------ training and options
def test_implicit_mode_forwards_solver_options_and_reports_deq_metrics():
    block = OptEqBlock(
        [4],
        training_mode="implicit",
        solver="anderson",
        max_iter=15,
        tol=1e-5,
        deq_options={"on_failure": "ignore", "backward_tol": 1e-6},
        name="opteq",
    )
    assert (block.deq.solver, block.deq.max_iter, block.deq.tol) == ("anderson", 15, 1e-5)
    assert block.deq.on_failure == "ignore" and block.deq.backward_tol == 1e-6
    model = keras.Sequential([keras.Input((4,)), block, keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.random.default_rng(15).normal(size=(16, 4)), np.arange(16) % 3
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert block.deq.solver_statistics()["fwd_steps"] > 1
    if keras.backend.backend() != "jax":  # JAX `fit` logs lack the DEQ's metrics
        assert history.history["opteq_deq_fwd_steps"][0] > 1
    with pytest.raises((TypeError, ValueError)):
        OptEqBlock([8], training_mode="implicit", deq_options={"no_such_option": 1})


def test_conv_block_trains_with_fit_and_its_implicit_mode_has_gradients():
    rng = np.random.default_rng(16)
    x, y = rng.normal(size=(8, 4, 4, 2)).astype("float32"), np.arange(8) % 2
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            OptEqBlock([2, 4], kind="conv", unroll_steps=3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    implicit = OptEqBlock(
        [2, 4], kind="conv", training_mode="implicit", solver="anderson", tol=1e-6
    )
    implicit.build(x.shape)
    loss = lambda out: ops.sum(out**2)  # noqa: E731
    grads = layer_gradients(implicit, x, loss, implicit.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert float(np.max(ops.convert_to_numpy(implicit.relative_residual(x)))) < 1e-5


def test_activity_regularizer_on_the_block_adds_the_feature_loss():
    block = OptEqBlock([6], unroll_steps=3, activity_regularizer=DecorrelationRegularizer(1.0))
    x = np.random.default_rng(17).normal(size=(10, 4)).astype("float32")
    z = block(x)
    assert len(block.losses) == 1
    assert float(block.losses[0]) == pytest.approx(float(decorrelation(z)) / 10, rel=1e-5)


# ------------------------------------------------------------------ serialization
@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": [6, 8], "prior": "l1", "prior_strength": 0.02, "alpha": 0.5},
        {"units": [6], "prior": "incay", "prior_mode": "sam", "sam_rho": 0.3, "sam_c": 0.1},
        {"units": [6], "training_mode": "implicit", "solver": "anderson", "tol": 1e-4},
        {"units": [4, 4], "kind": "conv", "learnable_alpha": True, "kernel_size": 5},
    ],
)
def test_block_config_round_trip_and_saved_model(kwargs, tmp_path):
    conv = kwargs.get("kind") == "conv"
    shape = (5, 5, 3) if conv else (4,)
    block = OptEqBlock(unroll_steps=4, **kwargs)
    clone = OptEqBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    model = keras.Sequential([keras.Input(shape), block, keras.layers.Flatten()])
    x = np.random.default_rng(18).normal(size=(3, *shape)).astype("float32")
    path = tmp_path / "opteq.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad hyper-parameters
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"alpha": "0.5"}, "alpha"),
        ({"alpha": 1.0, "learnable_alpha": True}, "alpha"),
        ({"unroll_steps": 0}, "unroll_steps"),
        ({"unroll_steps": 2.5}, "unroll_steps"),
        ({"prior": "l3"}, "prior"),
        ({"prior": "l2", "prior_mode": "both"}, "prior_mode"),
        ({"training_mode": "ift"}, "training_mode"),
        ({"kind": "attention"}, "kind"),
        ({"units": []}, "units"),
        ({"units": [4, 0]}, "units"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"prior": "l2", "prior_strength": -1.0}, "prior_strength"),
        ({"prior": "l2", "prior_mode": "sam", "sam_rho": 0.6, "sam_c": 0.3}, "sam_"),
        ({"prior": "l2", "prior_mode": "sam", "training_mode": "implicit"}, "training_mode"),
        ({"kind": "conv", "kernel_size": 4}, "kernel_size"),
        ({"training_mode": "implicit", "solver": "newton"}, "solver"),
    ],
)
def test_bad_hyper_parameters_are_refused_naming_the_argument(kwargs, argument):
    kwargs = {"units": [4], **kwargs}
    with pytest.raises(ValueError, match=argument):
        OptEqBlock(**kwargs)
