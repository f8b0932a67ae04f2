"""OptEq units, the deep OptEq cell and `OptEqBlock`, each against an independent computation."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq.layers import opteq

F64 = tf.float64
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def relu(v):
    return np.maximum(v, 0.0)


def numpy_unit(z, x, kernel, injection_kernel, bias, alpha=1.0, activation=relu):
    """`alpha W^T sigma(W z + U x + b) + (1 - alpha) z` with row vectors (W = kernel^T)."""
    full = activation(z @ kernel + x @ injection_kernel + bias) @ kernel.T
    return alpha * full + (1.0 - alpha) * z


def dense_unit(m, n, alpha=1.0, weights=None, dtype="float64", **kwargs):
    """A built `OptEqDenseUnit` on (batch, m) states and inputs, weights optionally set."""
    unit = opteq.OptEqDenseUnit(n, alpha=alpha, dtype=dtype, **kwargs)
    unit.build((None, m), (None, m))
    if weights is not None:
        unit.kernel.assign(weights[0])
        unit.injection_kernel.assign(weights[1])
        unit.bias.assign(weights[2])
    return unit


def random_weights(rng, m, n, norm):
    kernel = rng.normal(size=(m, n))
    return kernel * norm / np.linalg.norm(kernel, 2), rng.normal(size=(m, n)), rng.normal(size=n)


def iterate(fn, z0, steps):
    """`steps` applications of `fn` from `z0`, compiled (plain iteration, no prior)."""
    return tf.function(lambda z: opteq.sam_iteration(fn, z, steps))(tf.constant(z0)).numpy()


def count_firm_violations(fn, a, b, tol=1e-10):
    """Pairs with `||f(a) - f(b)||^2 > <f(a) - f(b), a - b>` (beyond `tol` relative)."""
    diff = fn(a) - fn(b)
    lhs = np.sum(diff.reshape(len(a), -1) ** 2, axis=1)
    rhs = np.sum((diff * (a - b)).reshape(len(a), -1), axis=1)
    return int(np.sum(lhs > rhs + tol * (1 + np.abs(rhs))))


# ------------------------------------------------------------------ units
@pytest.mark.parametrize(
    ("alpha", "activation", "np_activation"), [(1.0, "relu", relu), (0.7, "tanh", np.tanh)]
)
def test_dense_unit_matches_the_formula(alpha, activation, np_activation):
    rng = np.random.default_rng(0)
    weights = random_weights(rng, 5, 7, 0.9)
    unit = dense_unit(5, 7, alpha, weights, activation=activation)
    z, x = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    expected = numpy_unit(z, x, *weights, alpha=alpha, activation=np_activation)
    np.testing.assert_allclose(unit(z, x).numpy(), expected, rtol=1e-12)


def correlate(image, kernel):
    """Zero-padded "same" cross-correlation of a (H, W, C) image, plain numpy."""
    kh, kw, _, c_out = kernel.shape
    padded = np.pad(image, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((*image.shape[:2], c_out))
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            out[i, j] = np.einsum("abc,abcd->d", padded[i : i + kh, j : j + kw], kernel)
    return out


def conv_matrix(kernel, shape):
    basis = np.eye(shape[0] * shape[1] * kernel.shape[2])
    return np.stack(
        [correlate(e.reshape(*shape, kernel.shape[2]), kernel).ravel() for e in basis], 1
    )


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_conv_unit_is_w_transpose_sigma_w_with_the_exact_adjoint(kernel_size):
    rng = np.random.default_rng(1)
    unit = opteq.OptEqConvUnit(4, kernel_size=kernel_size, alpha=0.6, dtype="float64")
    unit.build((None, 5, 5, 2), (None, 5, 5, 3))
    unit.bias.assign(rng.normal(size=4))
    z, x = rng.normal(size=(5, 5, 2)), rng.normal(size=(5, 5, 3))
    w = conv_matrix(unit.kernel.numpy(), (5, 5))  # (H W n, H W m)
    u = conv_matrix(unit.injection_kernel.numpy(), (5, 5))
    pre = w @ z.ravel() + u @ x.ravel() + np.tile(unit.bias.numpy(), 25)
    expected = 0.6 * (w.T @ relu(pre)) + 0.4 * z.ravel()
    out = unit(z[None], x[None]).numpy()[0]
    np.testing.assert_allclose(out.ravel(), expected, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(w, 2) <= 1.0 + 1e-12  # the cap holds on the true operator


def test_relaxed_unit_has_the_fixed_points_of_the_plain_unit():
    rng = np.random.default_rng(2)
    weights = random_weights(rng, 8, 8, 0.9)
    x = rng.normal(size=(3, 8))
    z_star = np.zeros((3, 8))
    for _ in range(3000):  # numpy fixed point of the plain unit (a 0.81-contraction)
        z_star = numpy_unit(z_star, x, *weights)
    for alpha in (1.0, 0.5, 0.1):
        unit = dense_unit(8, 8, alpha, weights)
        residual = unit(z_star, x).numpy() - z_star
        assert np.max(np.abs(residual)) < 1e-13
        found = iterate(lambda z, u=unit: u(z, tf.constant(x)), np.zeros((3, 8)), 2500)
        np.testing.assert_allclose(found, z_star, atol=1e-11)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_capped_relu_unit_is_firmly_nonexpansive_and_the_test_has_power(alpha):
    rng = np.random.default_rng(3)
    # A large initializer: the SpectralNorm cap brings ||W|| down to 1 at build.
    unit = dense_unit(6, 10, alpha, kernel_initializer=keras.initializers.RandomNormal(0, 3.0))
    assert np.linalg.norm(unit.kernel.numpy(), 2) == pytest.approx(1.0, rel=1e-10)
    x = np.repeat(rng.normal(size=(1, 6)), 20_000, axis=0)
    a, b = rng.normal(size=(20_000, 6)) * 2, rng.normal(size=(20_000, 6)) * 2

    def f(v, u=unit):
        return u(v, x).numpy()

    assert count_firm_violations(f, a, b) == 0
    uncapped = dense_unit(6, 10, alpha, max_norm=None)
    kernel = unit.kernel.numpy() * 1.5
    uncapped.kernel.assign(kernel)
    uncapped.injection_kernel.assign(unit.injection_kernel.numpy())
    assert np.linalg.norm(uncapped.kernel.numpy(), 2) == pytest.approx(1.5)
    assert count_firm_violations(lambda v: uncapped(v, x).numpy(), a, b) > 1000


def test_capped_conv_unit_is_firmly_nonexpansive():
    rng = np.random.default_rng(4)
    unit = opteq.OptEqConvUnit(
        6, kernel_initializer=keras.initializers.RandomNormal(0, 2.0), dtype="float64"
    )
    unit.build((None, 6, 6, 3), (None, 6, 6, 3))
    x = np.repeat(rng.normal(size=(1, 6, 6, 3)), 1000, axis=0)
    a, b = rng.normal(size=(2, 1000, 6, 6, 3))
    assert count_firm_violations(lambda v: unit(v, x).numpy(), a, b) == 0


def test_fixed_point_minimizes_the_convex_objective_of_eq4():
    """ReLU, invertible 6x6 W with ||W|| = 0.8: z* minimizes phi over feasible points."""
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(6, 6))
    kernel *= 0.8 / np.linalg.norm(kernel, 2)
    c = rng.normal(size=6)  # U x + b
    unit = dense_unit(6, 6, 1.0, (kernel, np.zeros((6, 6)), c))
    z_star = iterate(lambda z: unit(z, tf.zeros((1, 6), F64)), np.zeros((1, 6)), 400)[0]
    w = kernel.T  # the paper's W (column vectors): W z = z @ kernel
    w_inv_t = np.linalg.inv(w).T

    def phi(z):
        u = w_inv_t @ z
        assert np.all(u >= -1e-12)  # inside the domain of sigma~*
        return 0.5 * u @ u - c @ u - 0.5 * z @ z

    u_star = w_inv_t @ z_star
    active = u_star < 1e-12
    assert 0 < active.sum() < 6  # both kinds of coordinates are exercised
    checked = 0
    for scale in (1e-4, 1e-2, 1e-1, 1.0):
        for _ in range(250):
            delta = rng.normal(size=6) * scale
            delta[active] = np.abs(delta[active])  # stay feasible: u = u* + delta >= 0
            if np.any(u_star + delta < 0):
                continue
            assert phi(z_star) <= phi(w.T @ (u_star + delta)) + 1e-12
            checked += 1
    assert checked > 500


def set_norms(cell, norms, rng):
    for unit, norm in zip(cell.unit_layers, norms, strict=True):
        kernel, injection, bias = random_weights(rng, *unit.kernel.shape, norm)
        unit.kernel.assign(kernel)
        unit.injection_kernel.assign(injection)
        unit.bias.assign(bias)


def test_deep_cell_obeys_the_contraction_bound_and_has_one_fixed_point():
    rng = np.random.default_rng(6)
    cell = opteq.OptEqCell([7, 9, 5], alpha=0.6, dtype="float64")
    cell.build((None, 6), (None, 6))
    norms = (0.95, 1.0, 0.8)
    set_norms(cell, norms, rng)
    bound = np.prod([0.6 * n**2 + 0.4 for n in norms])
    assert float(cell.lipschitz_bound()) == pytest.approx(bound, rel=1e-6)
    x = np.repeat(rng.normal(size=(1, 6)), 5000, axis=0)
    a, b = rng.normal(size=(2, 5000, 6)) * 3
    ratio = np.linalg.norm(cell(a, x).numpy() - cell(b, x).numpy(), axis=1) / np.linalg.norm(
        a - b, axis=1
    )
    assert ratio.max() <= bound and ratio.max() > 0.3 * bound
    starts = rng.normal(size=(3, 1, 6)) * 10
    ends = [iterate(lambda z: cell(z, tf.constant(x[:1])), s, 400) for s in starts]
    np.testing.assert_allclose(ends[1], ends[0], atol=1e-10)
    np.testing.assert_allclose(ends[2], ends[0], atol=1e-10)


def test_conv_cell_obeys_the_contraction_bound():
    rng = np.random.default_rng(7)
    cell = opteq.OptEqCell([4, 6], kind="conv", alpha=0.5, dtype="float64")
    cell.build((None, 5, 5, 3), (None, 5, 5, 3))
    bound = float(cell.lipschitz_bound())
    assert bound < 1
    x = np.repeat(rng.normal(size=(1, 5, 5, 3)), 500, axis=0)
    a, b = rng.normal(size=(2, 500, 5, 5, 3))
    diff = (cell(a, x).numpy() - cell(b, x).numpy()).reshape(500, -1)
    ratio = np.linalg.norm(diff, axis=1) / np.linalg.norm((a - b).reshape(500, -1), axis=1)
    assert ratio.max() <= bound


# ------------------------------------------------------------------ the block
def dense_block(units=(5, 7), **kwargs):
    block = opteq.OptEqBlock(list(units), dtype="float64", **kwargs)
    block.build((None, 4))
    return block


def copy_cell_weights(source, target):
    target.cell.set_weights(source.cell.get_weights())


def compiled(block, x):
    """`block(x)` in a `tf.function` (eager while-loops run their body in Python)."""
    return tf.function(lambda v: block(v))(tf.constant(x)).numpy()


def test_block_starts_at_the_input_and_runs_k_steps():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4))
    for steps in (1, 2, 3):
        block = dense_block(units=(6,), alpha=0.7, unroll_steps=steps)
        weights = [v.numpy() for v in block.cell.unit_layers[0].weights]
        z = x
        for _ in range(steps):
            z = numpy_unit(z, x, *weights, alpha=0.7)
        np.testing.assert_allclose(block(x).numpy(), z, rtol=1e-12)


def test_implicit_and_unrolled_blocks_reach_the_same_equilibrium():
    x = np.random.default_rng(9).normal(size=(5, 4))
    unrolled = dense_block(unroll_steps=300)
    implicit = dense_block(training_mode="implicit", tol=1e-11, max_iter=100)
    copy_cell_weights(unrolled, implicit)
    z = compiled(implicit, x)
    np.testing.assert_allclose(z, compiled(unrolled, x), atol=1e-9)
    assert float(tf.reduce_max(implicit.relative_residual(x))) < 1e-9


def block_gradients(block, x, probe):
    @tf.function
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(block(x, training=True) * probe)
        return tape.gradient(loss, [x, *block.cell.trainable_variables])

    return np.concatenate([g.numpy().ravel() for g in gradients(tf.constant(x))])


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


def test_unrolled_sam_block_and_its_gradient_compile_with_xla():
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


def test_learnable_alpha_starts_at_alpha_stays_in_0_1_and_trains():
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
    assert block.count_params() == 3 * (4 * 6 * 2 + 6 + 1)


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


@pytest.mark.parametrize("prior", opteq.PRIORS)
@pytest.mark.parametrize("mode", ["structural", "sam"])
def test_every_prior_and_mode_gives_finite_outputs_and_gradients(prior, mode):
    block = dense_block(prior=prior, prior_mode=mode, unroll_steps=5, prior_strength=0.05)
    grads = block_gradients(block, np.random.default_rng(13).normal(size=(6, 4)), 1.0)
    assert np.all(np.isfinite(grads)) and np.linalg.norm(grads) > 0


def test_sam_block_runs_the_sam_iteration_from_the_input():
    x = tf.constant(np.random.default_rng(14).normal(size=(6, 4)))
    block = dense_block(
        prior="decorrelation",
        prior_mode="sam",
        prior_strength=0.2,
        unroll_steps=8,
        sam_rho=0.3,
        sam_c=0.25,
    )
    prior = opteq.FeaturePrior("decorrelation", 0.2)
    manual = opteq.sam_iteration(block.map(x), x, 8, prior.gradient, rho=0.3, c=0.25, gamma=0.2)
    np.testing.assert_allclose(block(x).numpy(), manual.numpy(), rtol=1e-12)
    plain = dense_block(unroll_steps=8)
    copy_cell_weights(block, plain)
    assert np.max(np.abs(plain(x).numpy() - manual.numpy())) > 1e-3


def test_max_norm_and_initializer_options():
    big = keras.initializers.RandomNormal(0, 3.0, seed=0)
    loose = dense_unit(5, 5, max_norm=None, kernel_initializer=big)
    tight = dense_unit(5, 5, max_norm=0.5, kernel_initializer=big)
    assert np.linalg.norm(loose.kernel.numpy(), 2) > 5
    assert np.linalg.norm(tight.kernel.numpy(), 2) == pytest.approx(0.5, rel=1e-10)
    assert loose.kernel.constraint is None
    no_injection = dense_unit(5, 5, injection_initializer="zeros")
    assert not np.any(no_injection.injection_kernel.numpy())


def test_implicit_mode_forwards_solver_options_and_reports_deq_metrics():
    block = opteq.OptEqBlock(
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
    assert history.history["opteq_deq_fwd_steps"][0] > 1
    with pytest.raises((TypeError, ValueError)):
        opteq.OptEqBlock([8], training_mode="implicit", deq_options={"no_such_option": 1})


def test_conv_block_trains_with_fit_and_its_implicit_mode_has_gradients():
    rng = np.random.default_rng(16)
    x, y = rng.normal(size=(8, 4, 4, 2)).astype("float32"), np.arange(8) % 2
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            opteq.OptEqBlock([2, 4], kind="conv", unroll_steps=3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    implicit = opteq.OptEqBlock(
        [2, 4], kind="conv", training_mode="implicit", solver="anderson", tol=1e-6
    )
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(implicit(x, training=True) ** 2)
    grads = tape.gradient(loss, [x, *implicit.trainable_variables])
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert float(tf.reduce_max(implicit.relative_residual(x))) < 1e-5


def test_activity_regularizer_on_the_block_adds_the_feature_loss():
    block = opteq.OptEqBlock(
        [6], unroll_steps=3, activity_regularizer=opteq.DecorrelationRegularizer(1.0)
    )
    x = np.random.default_rng(17).normal(size=(10, 4)).astype("float32")
    z = block(x)
    assert len(block.losses) == 1
    assert float(block.losses[0]) == pytest.approx(float(opteq.decorrelation(z)) / 10, rel=1e-5)


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
    block = opteq.OptEqBlock(unroll_steps=4, **kwargs)
    clone = opteq.OptEqBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    model = keras.Sequential([keras.Input(shape), block, keras.layers.Flatten()])
    x = np.random.default_rng(18).normal(size=(3, *shape)).astype("float32")
    path = tmp_path / "opteq.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_units_and_cell_config_round_trip():
    for layer in (
        opteq.OptEqDenseUnit(5, alpha=0.3, learnable_alpha=True, max_norm=None),
        opteq.OptEqConvUnit(5, kernel_size=5, activation="tanh"),
        opteq.OptEqCell([3, 4], kind="conv", prior="decorrelation", prior_strength=0.3),
    ):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()


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
        opteq.OptEqBlock(**kwargs)


# ------------------------------------------------------------------ the CIFAR-10 example
def load_example():
    path = ROOT / "examples" / "vision" / "opteq_cifar10.py"
    spec = importlib.util.spec_from_file_location("opteq_cifar10_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_cifar10_model_has_199k_parameters():
    example = load_example()
    model = example.build_opteq_model("cifar10")
    block = model.get_layer("opteq")
    # Five 3x3 units n_l = 16/32/64/128/128 on a 30-channel state and input:
    # sum_l n_l (9*30 [W_l] + 9*30 [U_l] + 1 [b_l]) = 368 * 541.
    assert block.count_params() == 199_088
    assert model.count_params() == 199_088 + (27 * 30 + 30) + (30 * 10 + 10)
    assert abs(model.count_params() - 199_000) / 199_000 < 0.01


def test_explicit_baseline_matches_the_parameter_count():
    example = load_example()
    for dataset in ("digits", "cifar10"):
        opteq_params = example.build_opteq_model(dataset).count_params()
        explicit = example.build_explicit_model(dataset, target_params=opteq_params)
        assert abs(explicit.count_params() - opteq_params) / opteq_params < 0.03


@pytest.mark.slow
def test_example_trains_on_digits_and_prints_the_accuracy(capsys):
    accuracy = load_example().main(
        ["--kind", "dense", "--epochs", "1", "--limit", "200", "--prior", "l1", "--verbose", "0"]
    )
    out = capsys.readouterr().out
    assert "parameters: 66730" in out and "test accuracy:" in out
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_example_conv_digits_default_reaches_90_percent():
    assert load_example().main(["--verbose", "0"]) >= 0.90


@pytest.mark.slow
def test_unroll_benchmark_runs_end_to_end():
    path = ROOT / "benchmarks" / "opteq_unroll.py"
    spec = importlib.util.spec_from_file_location("opteq_unroll_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(
        ["--epochs", "1", "--repeats", "1", "--calls", "1", "--must-show", "--seeds", "1"]
    )
    assert len(results["table"]) == 6 and len(results["must_show"]) == 3
