"""OptEq priors, feature regularizers and the SAM iteration, against numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq.layers import opteq

F64 = tf.float64


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def numpy_decorrelation(z):
    """`1/2 ||D Z Z^T D - I||_F^2` with `Z` = features x samples, straight from Eq. 13."""
    zt = z.reshape(-1, z.shape[-1]).T
    d = np.diag(1.0 / np.linalg.norm(zt, axis=1))
    return 0.5 * np.sum((d @ zt @ zt.T @ d - np.eye(zt.shape[0])) ** 2)


def numpy_hsic_sum(z, sigma):
    """`sum_{i<j} tr(K_i H K_j H) / (B - 1)^2` with explicit loops (Section 7.2.1);
    a 4-D `z` counts every position as a sample."""
    z = z.reshape(-1, z.shape[-1])
    b = z.shape[0]
    h = np.eye(b) - np.ones((b, b)) / b
    kernels = [np.exp(-((f[:, None] - f[None, :]) ** 2) / (2 * sigma**2)) for f in z.T]
    total = 0.0
    for i in range(len(kernels)):
        for j in range(i + 1, len(kernels)):
            total += np.trace(kernels[i] @ h @ kernels[j] @ h) / (b - 1) ** 2
    return total


def finite_difference_gradient(fn, z, eps=1e-6):
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad


# ------------------------------------------------------------------ prox closed forms
@pytest.mark.parametrize("name", ["l2", "l1"])
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_prox_closed_forms_match_brute_force_minimization(name, gamma):
    """prox_{gamma R}(z) = argmin_u 1/2 (u - z)^2 + gamma R(u), minimized on a grid."""
    regularizer = {"l2": lambda u: 0.5 * u**2, "l1": np.abs}[name]
    grid = np.linspace(-6.0, 6.0, 240_001)
    z = np.array([-4.0, -1.7, -0.2, 0.0, 0.4, 1.1, 3.3])
    brute = np.array(
        [grid[np.argmin(0.5 * (grid - v) ** 2 + gamma * regularizer(grid))] for v in z]
    )
    prior = opteq.FeaturePrior(name, strength=gamma)
    closed = prior.step(tf.constant(z[None, :], F64)).numpy()[0]
    np.testing.assert_allclose(closed, brute, atol=1e-4)


def test_soft_threshold_is_zero_inside_the_threshold():
    out = opteq.soft_threshold(tf.constant([-0.5, 0.2, 0.9]), 1.0).numpy()
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])


def test_incay_step_is_a_gradient_step_that_expands_features():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4))
    gamma, eps = 0.5, 0.7

    def incay_np(v):
        return np.sum(2.0 / (np.sum(v**2, axis=1) + 2 * eps))

    prior = opteq.FeaturePrior("incay", strength=gamma, epsilon=eps)
    step = prior.step(tf.constant(z, F64)).numpy()
    np.testing.assert_allclose(step, z - gamma * finite_difference_gradient(incay_np, z), atol=1e-7)
    assert np.all(np.linalg.norm(step, axis=1) > np.linalg.norm(z, axis=1))
    np.testing.assert_allclose(float(prior.value(tf.constant(z, F64))), incay_np(z), rtol=1e-12)


# ------------------------------------------------------------------ decorrelation
def test_decorrelation_is_zero_on_orthogonal_features_and_matches_eq13():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(16, 5)))  # 5 orthonormal feature columns
    orthogonal = q * np.array([0.5, 1.0, 2.0, 3.0, 7.0])  # any feature scales
    assert float(opteq.decorrelation(tf.constant(orthogonal, F64))) == pytest.approx(0, abs=1e-20)
    correlated = rng.normal(size=(16, 5)) + 0.5
    value = float(opteq.decorrelation(tf.constant(correlated, F64)))
    assert value == pytest.approx(numpy_decorrelation(correlated), rel=1e-10)
    assert value > 0.1


def test_decorrelation_treats_spatial_axes_as_samples():
    z = np.random.default_rng(2).normal(size=(2, 3, 3, 4))
    value = float(opteq.decorrelation(tf.constant(z, F64)))
    assert value == pytest.approx(numpy_decorrelation(z.reshape(-1, 4)), rel=1e-10)


def test_decorrelation_gradient_matches_finite_differences():
    z = np.random.default_rng(3).normal(size=(6, 4)) + 0.3
    closed = opteq.decorrelation_gradient(tf.constant(z, F64)).numpy()
    np.testing.assert_allclose(
        closed, finite_difference_gradient(numpy_decorrelation, z), rtol=1e-6, atol=1e-8
    )


def test_decorrelation_regularizer_value_gradient_and_descent():
    z = np.random.default_rng(4).normal(size=(8, 3)) + 0.5
    regularizer = opteq.DecorrelationRegularizer(strength=0.3)
    variable = tf.Variable(z, dtype=F64)
    with tf.GradientTape() as tape:
        value = regularizer(variable)
    grad = tape.gradient(value, variable).numpy()
    assert float(value) == pytest.approx(0.3 * numpy_decorrelation(z), rel=1e-10)
    np.testing.assert_allclose(
        grad, 0.3 * finite_difference_gradient(numpy_decorrelation, z), rtol=1e-6, atol=1e-8
    )
    assert numpy_decorrelation(z - 0.05 * grad) < numpy_decorrelation(z)


def test_decorrelation_prior_step_is_a_gradient_step():
    z = np.random.default_rng(5).normal(size=(7, 3))
    prior = opteq.FeaturePrior("decorrelation", strength=0.2)
    step = prior.step(tf.constant(z, F64)).numpy()
    expected = z - 0.2 * finite_difference_gradient(numpy_decorrelation, z)
    np.testing.assert_allclose(step, expected, rtol=1e-6, atol=1e-8)
    assert numpy_decorrelation(step) < numpy_decorrelation(z)


@pytest.mark.parametrize("name", ["l2", "incay", "decorrelation", "hsic"])
def test_prior_gradient_matches_autodiff_of_its_value(name):
    z = tf.constant(np.random.default_rng(6).normal(size=(5, 4)), F64)
    prior = opteq.FeaturePrior(name, strength=0.1, epsilon=0.5)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = prior.value(z)
    np.testing.assert_allclose(prior.gradient(z).numpy(), tape.gradient(value, z).numpy(), 1e-9)


# ------------------------------------------------------------------ HSIC and other regularizers
def test_hsic_matches_the_pairwise_trace_formula():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 1))
    z = np.concatenate([base, np.sin(2 * base), rng.normal(size=(12, 2))], axis=1)
    value = float(opteq.HSICRegularizer(strength=2.0, sigma=0.8)(tf.constant(z, F64)))
    assert value == pytest.approx(2.0 * numpy_hsic_sum(z, 0.8), rel=1e-10)
    many = rng.normal(size=(64, 1))
    dependent = float(opteq.hsic(tf.constant(np.concatenate([many, many**2], 1), F64)))
    independent = float(opteq.hsic(tf.constant(rng.normal(size=(64, 2)), F64)))
    assert dependent > 5 * independent


def test_feature_regularizer_reuses_keras_l1_l2():
    assert isinstance(opteq.feature_regularizer("l1", 0.1), keras.regularizers.L1)
    assert isinstance(opteq.feature_regularizer("l2", 0.1), keras.regularizers.L2)
    assert isinstance(opteq.feature_regularizer("hsic", 0.1, sigma=2.0), opteq.HSICRegularizer)
    assert isinstance(opteq.feature_regularizer("decorrelation"), opteq.DecorrelationRegularizer)
    with pytest.raises(ValueError, match="name"):
        opteq.feature_regularizer("l3")


def test_regularizers_work_as_activity_regularizers_and_serialize():
    x = np.random.default_rng(8).normal(size=(16, 5)).astype("float32")
    for regularizer in (opteq.DecorrelationRegularizer(0.5), opteq.HSICRegularizer(0.5, 2.0)):
        layer = keras.layers.Dense(4, activity_regularizer=regularizer)
        layer(x)
        assert len(layer.losses) == 1 and float(layer.losses[0]) > 0
        config = keras.saving.serialize_keras_object(regularizer)
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(regularizer) and clone.get_config() == regularizer.get_config()


def test_feature_prior_round_trips_and_refuses_bad_arguments():
    prior = opteq.FeaturePrior("incay", strength=0.3, epsilon=2.0)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(prior))
    assert clone.get_config() == prior.get_config()
    with pytest.raises(ValueError, match="prior"):
        opteq.FeaturePrior("l0")
    with pytest.raises(ValueError, match="prior_strength"):
        opteq.FeaturePrior("l2", strength=-1.0)
    with pytest.raises(ValueError, match="prior_epsilon"):
        opteq.FeaturePrior("incay", epsilon=0.0)
    with pytest.raises(ValueError, match="strength"):
        opteq.DecorrelationRegularizer(-0.1)
    with pytest.raises(ValueError, match="sigma"):
        opteq.HSICRegularizer(0.1, sigma=0.0)


# ------------------------------------------------------------------ SAM
def _projector_problem(seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 3)))
    projector = basis @ basis.T  # nonexpansive, Fix = a 3-dim subspace
    anchor = rng.normal(size=6)
    return projector, anchor, projector @ anchor  # argmin_{z in Fix} 1/2 ||z - a||^2


def test_sam_selects_the_least_prior_fixed_point_of_a_projector():
    projector, anchor, target = _projector_problem()
    p = tf.constant(projector, F64)
    a = tf.constant(anchor[None, :], F64)
    z0 = tf.constant(np.random.default_rng(1).normal(size=(1, 6)) * 2.0, F64)

    def run(steps, grad_r):
        solve = tf.function(
            lambda: opteq.sam_iteration(
                lambda z: tf.matmul(z, p), z0, steps, grad_r=grad_r, rho=0.5, c=0.2, gamma=0.5
            )
        )
        return float(np.linalg.norm(solve().numpy()[0] - target))

    errors = [run(k, lambda z: z - a) for k in (20, 100, 1_000, 10_000)]
    plain = run(1_000, None)  # plain iteration stops at P z0, another fixed point
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.2 and plain > 1.0
    assert errors[-1] < plain / 5


def test_sam_without_prior_is_plain_iteration():
    w = np.random.default_rng(2).normal(size=(4, 4)) * 0.3
    z = np.ones((2, 4))
    out = opteq.sam_iteration(lambda v: tf.tanh(tf.matmul(v, w) + 1.0), tf.constant(z), 7)
    for _ in range(7):
        z = np.tanh(z @ w + 1.0)
    np.testing.assert_allclose(out.numpy(), z, rtol=1e-12)


def test_sam_runs_in_graph_mode_and_under_xla():
    projector, anchor, _ = _projector_problem(3)
    p, a = tf.constant(projector, F64), tf.constant(anchor[None, :], F64)

    def run(z0):
        return opteq.sam_iteration(lambda z: tf.matmul(z, p), z0, 50, grad_r=lambda z: z - a)

    z0 = tf.zeros((1, 6), F64)
    eager = run(z0).numpy()
    np.testing.assert_allclose(tf.function(run)(z0).numpy(), eager, rtol=1e-12)
    np.testing.assert_allclose(tf.function(run, jit_compile=True)(z0).numpy(), eager, rtol=1e-10)


def test_sam_schedule_and_steps_are_checked():
    with pytest.raises(ValueError, match="rho \\+ 2c < 1"):
        opteq.check_sam_schedule(0.5, 0.3)
    with pytest.raises(ValueError, match="sam_rho"):
        opteq.check_sam_schedule(0.0, 0.2)
    with pytest.raises(ValueError, match="sam_c"):
        opteq.check_sam_schedule(0.5, -0.1)
    with pytest.raises(ValueError, match="steps"):
        opteq.sam_iteration(lambda z: z, tf.zeros((1, 2)), 0)


# ------------------------------------------------------------------ what a structural prior minimizes
def argmin_unit_objective(kernel, c, prox_h, alpha, rho=1.0, iters=4000):
    """`argmin_z alpha M_phi^{1 - alpha}(z) + h(z)` (`phi + h` at `alpha = 1`), by ADMM.

    `phi` is the convex function of Eq. 4 whose prox is the ReLU unit
    `z -> A relu(A^T z + c)` (`A = kernel`, invertible, `||A|| < 1`): with
    `z = A u`, `phi = 1/2 ||u||^2 - <c, u> - 1/2 ||A u||^2` on `u >= 0`. The
    relaxed unit is the prox of `alpha M_phi^{1 - alpha}`, and
    `alpha M_phi^{1 - alpha}(z) = min_u alpha phi(A u) + beta/2 ||A u - z||^2`
    with `beta = alpha / (1 - alpha)`. So the problem is a strongly convex
    quadratic in `w` (`u`, or `(u, z)` when `alpha < 1`) plus `g(M w)`, with
    `g(p) = [p_u >= 0] + h(p_z)` and `prox_h(v, t)` (the prox of `t h`) given:
    ADMM on `w` and `p = M w`. `c` is `(m, batch)`: one problem per column.
    """
    m = kernel.shape[0]
    eye = np.eye(m)
    if alpha == 1.0:
        quad, linear = eye - kernel.T @ kernel, c
        split = np.vstack([eye, kernel])  # p = (u, z = A u)

        def state(w):
            return kernel @ w

    else:
        beta = alpha / (1.0 - alpha)
        quad = np.block(
            [
                [alpha * (eye - kernel.T @ kernel) + beta * kernel.T @ kernel, -beta * kernel.T],
                [-beta * kernel, beta * eye],
            ]
        )
        linear = np.concatenate([alpha * c, np.zeros_like(c)])
        split = np.eye(2 * m)  # p = (u, z)

        def state(w):
            return w[m:]

    solve = np.linalg.inv(quad + rho * split.T @ split)
    p = np.zeros((split.shape[0], c.shape[1]))
    y = np.zeros_like(p)
    for _ in range(iters):
        w = solve @ (linear + rho * split.T @ (p - y))
        mw = split @ w
        v = mw + y
        p_new = np.concatenate([np.maximum(v[:m], 0.0), prox_h(v[m:], 1.0 / rho)])
        y += mw - p_new
        change, p = np.max(np.abs(p_new - p)), p_new
    assert change < 1e-14 and np.max(np.abs(mw - p)) < 1e-14  # converged
    return state(w).T


def prox_quadratic(weight):
    """`prox` of `t weight/2 ||.||^2`."""
    return lambda v, t: v / (1.0 + t * weight)


def prox_l1(weight):
    """`prox` of `t weight ||.||_1`."""
    return lambda v, t: np.sign(v) * np.maximum(np.abs(v) - t * weight, 0.0)


def prox_huber(gamma):
    """`prox` of `t M_{gamma ||.||_1}`: `M` is the Huber function of width `gamma`."""
    return lambda v, t: np.where(
        np.abs(v) <= gamma * (1.0 + t), v / (1.0 + t), v - t * gamma * np.sign(v)
    )


def structural_equilibrium(prior, gamma, alpha, kernel, injection, bias, x):
    """The `OptEqBlock` output (one dense unit, float64, 200 steps from `z0 = x`)."""
    block = opteq.OptEqBlock(
        [kernel.shape[1]],
        alpha=alpha,
        prior=prior,
        prior_strength=gamma,
        unroll_steps=200,  # Lip <= alpha 0.64 + 1 - alpha <= 0.72: converged to 1e-28
        dtype="float64",
    )
    block.build((None, kernel.shape[0]))
    unit = block.cell.unit_layers[0]
    for variable, value in zip(
        (unit.kernel, unit.injection_kernel, unit.bias), (kernel, injection, bias), strict=True
    ):
        variable.assign(value)
    return block(tf.constant(x)).numpy()


@pytest.mark.parametrize("alpha", [1.0, 0.8])
@pytest.mark.parametrize("prior", ["l2", "l1"])
def test_prox_prior_minimizes_phi_plus_the_moreau_envelope_not_phi_plus_gamma_r(prior, alpha):
    """The structural prox prior's equilibrium is `argmin phi + M_{gamma R}` (alpha = 1),
    with `M_{gamma R}` the Moreau envelope, not `argmin phi + gamma R` (what Theorem 4
    says of the gradient step): pinned against a direct optimizer of each objective.
    For alpha < 1, `phi` becomes `alpha M_phi^{1 - alpha}` (the relaxed unit's function)."""
    rng = np.random.default_rng(21)
    m, gamma = 6, {"l2": 0.7, "l1": 0.25}[prior]
    kernel = rng.normal(size=(m, m))
    kernel *= 0.8 / np.linalg.norm(kernel, 2)
    injection, bias, x = rng.normal(size=(m, m)), rng.normal(size=m), rng.normal(size=(3, m))
    c = (x @ injection + bias).T  # U x + b, one column per sample
    z = structural_equilibrium(prior, gamma, alpha, kernel, injection, bias, x)

    if prior == "l2":  # M_{gamma/2 ||.||^2} = gamma / (2 (1 + gamma)) ||.||^2
        envelope, plain = prox_quadratic(gamma / (1.0 + gamma)), prox_quadratic(gamma)
    else:  # M_{gamma ||.||_1} = Huber
        envelope, plain = prox_huber(gamma), prox_l1(gamma)
        shrunk = np.abs(z) <= gamma
        assert shrunk.any() and (~shrunk).any()  # both pieces of the Huber function
    stated = argmin_unit_objective(kernel, c, envelope, alpha)
    old_statement = argmin_unit_objective(kernel, c, plain, alpha)
    np.testing.assert_allclose(z, stated, rtol=0, atol=1e-12)
    assert np.max(np.abs(z - old_statement)) > 0.05


def test_l2_prior_strength_for_a_given_quadratic_weight():
    """`phi + lam/2 ||z||^2` (lam < 1) is the l2 prox prior at strength lam / (1 - lam)."""
    rng = np.random.default_rng(22)
    m, lam = 5, 0.4
    kernel = rng.normal(size=(m, m))
    kernel *= 0.7 / np.linalg.norm(kernel, 2)
    injection, bias, x = rng.normal(size=(m, m)), rng.normal(size=m), rng.normal(size=(2, m))
    z = structural_equilibrium("l2", lam / (1 - lam), 1.0, kernel, injection, bias, x)
    expected = argmin_unit_objective(kernel, (x @ injection + bias).T, prox_quadratic(lam), 1.0)
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-12)


def test_float64_priors_and_sam_use_their_float64_hyper_parameters():
    """`gamma`, `rho`, `c` enter float64 computations unrounded (not through float32)."""
    z = np.random.default_rng(23).normal(size=(3, 4))
    step = opteq.FeaturePrior("l2", strength=0.7).step(tf.constant(z, F64)).numpy()
    np.testing.assert_allclose(step, z / 1.7, rtol=1e-15, atol=0)
    w = np.random.default_rng(24).normal(size=(4, 4)) * 0.3
    out = opteq.sam_iteration(
        lambda v: tf.tanh(tf.matmul(v, w)),
        tf.constant(z),
        5,
        lambda v: v,
        rho=0.3,
        c=0.1,
        gamma=0.7,
    )
    for k in range(1, 6):
        beta = 0.3 / k**0.1
        z = beta * ((1 - 0.7 * beta) * z - 0.7 * z) + (1 - beta) * np.tanh(z @ w)
    np.testing.assert_allclose(out.numpy(), z, rtol=1e-13, atol=0)
