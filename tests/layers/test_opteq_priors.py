"""OptEq priors (`FeaturePrior`): closed-form operators, gradients, what they minimize, HSIC."""

import keras
import numpy as np
import pytest
from feature_references import finite_difference_gradient, numpy_decorrelation, numpy_hsic_sum
from keras import ops
from opteq_references import gradient

from keras_deq.features import hsic_gradient
from keras_deq.layers.opteq_block import OptEqBlock
from keras_deq.layers.opteq_cell import OptEqCell
from keras_deq.layers.opteq_priors import FeaturePrior

F64 = "float64"


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


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
    prior = FeaturePrior(name, strength=gamma)
    closed = np.asarray(prior.step(ops.convert_to_tensor(z[None, :], F64)))[0]
    np.testing.assert_allclose(closed, brute, atol=1e-4)


@pytest.mark.float64
def test_incay_step_is_a_gradient_step_that_expands_features():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4))
    gamma, eps = 0.5, 0.7

    def incay_np(v):
        return np.sum(2.0 / (np.sum(v**2, axis=1) + 2 * eps))

    prior = FeaturePrior("incay", strength=gamma, epsilon=eps)
    step = np.asarray(prior.step(ops.convert_to_tensor(z, F64)))
    np.testing.assert_allclose(step, z - gamma * finite_difference_gradient(incay_np, z), atol=1e-7)
    assert np.all(np.linalg.norm(step, axis=1) > np.linalg.norm(z, axis=1))
    np.testing.assert_allclose(
        float(prior.value(ops.convert_to_tensor(z, F64))), incay_np(z), rtol=1e-12
    )


@pytest.mark.float64
# ------------------------------------------------------------------ gradient steps
def test_decorrelation_prior_step_is_a_gradient_step():
    z = np.random.default_rng(5).normal(size=(7, 3))
    prior = FeaturePrior("decorrelation", strength=0.2)
    step = np.asarray(prior.step(ops.convert_to_tensor(z, F64)))
    expected = z - 0.2 * finite_difference_gradient(numpy_decorrelation, z)
    np.testing.assert_allclose(step, expected, rtol=1e-6, atol=1e-8)
    assert numpy_decorrelation(step) < numpy_decorrelation(z)


@pytest.mark.float64
@pytest.mark.parametrize("name", ["l2", "incay", "decorrelation", "hsic"])
def test_prior_gradient_matches_autodiff_of_its_value(name):
    z = ops.convert_to_tensor(np.random.default_rng(6).normal(size=(5, 4)), F64)
    prior = FeaturePrior(name, strength=0.1, epsilon=0.5)
    expected = np.asarray(gradient(prior.value, z))
    np.testing.assert_allclose(np.asarray(prior.gradient(z)), expected, 1e-9)


@pytest.mark.float64
@pytest.mark.parametrize("shape", [(9, 3), (2, 3, 3, 2)])
def test_hsic_prior_gradient_and_step_match_finite_differences(shape):
    """`grad R` of the HSIC prior is the gradient of the pairwise HSIC sum, and its
    structural operator is the gradient step `z - gamma grad R(z)` (Theorem 4's form)."""
    z = np.random.default_rng(1).normal(size=shape)
    sigma, gamma = 0.8, 0.3
    prior = FeaturePrior("hsic", strength=gamma, sigma=sigma)
    numeric = finite_difference_gradient(lambda v: numpy_hsic_sum(v, sigma), z)
    assert np.max(np.abs(numeric)) > 1e-3  # a test with power
    z_t = ops.convert_to_tensor(z, F64)
    np.testing.assert_allclose(np.asarray(prior.gradient(z_t)), numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(hsic_gradient(z_t, sigma)), numeric, rtol=1e-6, atol=1e-9)
    step = np.asarray(prior.step(z_t))
    np.testing.assert_allclose(step, z - gamma * numeric, rtol=1e-6, atol=1e-9)
    assert float(prior.value(z_t)) == pytest.approx(numpy_hsic_sum(z, sigma), rel=1e-12)
    # A small step lowers the HSIC sum.
    small = np.asarray(FeaturePrior("hsic", strength=0.05, sigma=sigma).step(z_t))
    assert numpy_hsic_sum(small, sigma) < numpy_hsic_sum(z, sigma)


# ------------------------------------------------------------------ configuration
def test_feature_prior_round_trips_and_refuses_bad_arguments():
    prior = FeaturePrior("incay", strength=0.3, epsilon=2.0)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(prior))
    assert clone.get_config() == prior.get_config()
    with pytest.raises(ValueError, match="prior"):
        FeaturePrior("l0")
    with pytest.raises(ValueError, match="prior_strength"):
        FeaturePrior("l2", strength=-1.0)
    with pytest.raises(ValueError, match="prior_epsilon"):
        FeaturePrior("incay", epsilon=0.0)


def test_hsic_prior_config_round_trips_and_saves(tmp_path):
    prior = FeaturePrior("hsic", strength=0.3, sigma=0.7)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(prior))
    assert clone.get_config() == prior.get_config() and clone.sigma == 0.7
    # A config saved before `sigma` existed still loads (the default bandwidth).
    assert FeaturePrior.from_config({"name": "l2", "strength": 0.1, "epsilon": 1.0}).sigma == 1

    for kwargs in ({"prior_mode": "structural"}, {"prior_mode": "sam"}):
        block = OptEqBlock([6], prior="hsic", prior_sigma=0.7, unroll_steps=4, **kwargs)
        assert block.get_config()["prior_sigma"] == 0.7
        clone = OptEqBlock.from_config(block.get_config())
        assert clone.get_config() == block.get_config()
        prior = clone.cell.prior if kwargs["prior_mode"] == "structural" else clone.sam_prior
        assert prior.name == "hsic" and prior.sigma == 0.7
        model = keras.Sequential([keras.Input((4,)), block])
        x = np.random.default_rng(9).normal(size=(5, 4)).astype("float32")
        path = tmp_path / f"hsic_{kwargs['prior_mode']}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6
        )
    cell = OptEqCell([3], prior="hsic", prior_sigma=2.0)
    cell_clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cell))
    assert cell_clone.get_config() == cell.get_config() and cell_clone.prior.sigma == 2.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), "1", True])
def test_bad_hsic_bandwidths_are_refused_naming_the_argument(sigma):
    with pytest.raises(ValueError, match="prior_sigma"):
        OptEqBlock([4], prior="hsic", prior_sigma=sigma)
    with pytest.raises(ValueError, match="prior_sigma"):
        OptEqCell([4], prior="hsic", prior_sigma=sigma)
    with pytest.raises(ValueError, match="sigma"):
        FeaturePrior("hsic", sigma=sigma)


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
    block = OptEqBlock(
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
    return np.asarray(block(ops.convert_to_tensor(x)))


@pytest.mark.float64
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


@pytest.mark.float64
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


@pytest.mark.float64
def test_float64_priors_use_their_float64_strength():
    """`gamma` enters float64 computations unrounded (not through float32)."""
    z = np.random.default_rng(23).normal(size=(3, 4))
    step = np.asarray(FeaturePrior("l2", strength=0.7).step(ops.convert_to_tensor(z, F64)))
    np.testing.assert_allclose(step, z / 1.7, rtol=1e-15, atol=0)
