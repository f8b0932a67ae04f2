"""OptEq units (`OptEqDenseUnit`, `OptEqConvUnit`) against numpy and the paper's theorems."""

import keras
import numpy as np
import pytest
from conv_references import operator_matrix
from keras import ops
from opteq_references import dense_unit, iterate, numpy_unit, random_weights, relu

from keras_deq.layers.opteq_units import OptEqConvUnit, OptEqDenseUnit

F64 = "float64"


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def count_firm_violations(fn, a, b, tol=1e-10):
    """Pairs with `||f(a) - f(b)||^2 > <f(a) - f(b), a - b>` (beyond `tol` relative)."""
    diff = fn(a) - fn(b)
    lhs = np.sum(diff.reshape(len(a), -1) ** 2, axis=1)
    rhs = np.sum((diff * (a - b)).reshape(len(a), -1), axis=1)
    return int(np.sum(lhs > rhs + tol * (1 + np.abs(rhs))))


@pytest.mark.float64
@pytest.mark.parametrize(
    ("alpha", "activation", "np_activation"), [(1.0, "relu", relu), (0.7, "tanh", np.tanh)]
)
def test_dense_unit_matches_the_formula(alpha, activation, np_activation):
    rng = np.random.default_rng(0)
    weights = random_weights(rng, 5, 7, 0.9)
    unit = dense_unit(5, 7, alpha, weights, activation=activation)
    z, x = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    expected = numpy_unit(z, x, *weights, alpha=alpha, activation=np_activation)
    np.testing.assert_allclose(np.asarray(unit(z, x)), expected, rtol=1e-12)


@pytest.mark.float64
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_conv_unit_is_w_transpose_sigma_w_with_the_exact_adjoint(kernel_size):
    rng = np.random.default_rng(1)
    unit = OptEqConvUnit(4, kernel_size=kernel_size, alpha=0.6, dtype="float64")
    unit.build((None, 5, 5, 2), (None, 5, 5, 3))
    unit.bias.assign(rng.normal(size=4))
    z, x = rng.normal(size=(5, 5, 2)), rng.normal(size=(5, 5, 3))
    w = operator_matrix(unit.kernel.numpy(), (5, 5))  # (H W n, H W m)
    u = operator_matrix(unit.injection_kernel.numpy(), (5, 5))
    pre = w @ z.ravel() + u @ x.ravel() + np.tile(unit.bias.numpy(), 25)
    expected = 0.6 * (w.T @ relu(pre)) + 0.4 * z.ravel()
    out = np.asarray(unit(z[None], x[None]))[0]
    np.testing.assert_allclose(out.ravel(), expected, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(w, 2) <= 1.0 + 1e-12  # the cap holds on the true operator


@pytest.mark.float64
def test_relaxed_unit_has_the_fixed_points_of_the_plain_unit():
    rng = np.random.default_rng(2)
    weights = random_weights(rng, 8, 8, 0.9)
    x = rng.normal(size=(3, 8))
    z_star = np.zeros((3, 8))
    for _ in range(3000):  # numpy fixed point of the plain unit (a 0.81-contraction)
        z_star = numpy_unit(z_star, x, *weights)
    for alpha in (1.0, 0.5, 0.1):
        unit = dense_unit(8, 8, alpha, weights)
        residual = np.asarray(unit(z_star, x)) - z_star
        assert np.max(np.abs(residual)) < 1e-13
        found = iterate(lambda z, u=unit: u(z, ops.convert_to_tensor(x)), np.zeros((3, 8)), 2500)
        np.testing.assert_allclose(found, z_star, atol=1e-11)


@pytest.mark.float64
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_capped_relu_unit_is_firmly_nonexpansive_and_the_test_has_power(alpha):
    rng = np.random.default_rng(3)
    # A large initializer: the SpectralNorm cap brings ||W|| down to 1 at build.
    unit = dense_unit(6, 10, alpha, kernel_initializer=keras.initializers.RandomNormal(0, 3.0))
    assert np.linalg.norm(unit.kernel.numpy(), 2) == pytest.approx(1.0, rel=1e-10)
    x = np.repeat(rng.normal(size=(1, 6)), 20_000, axis=0)
    a, b = rng.normal(size=(20_000, 6)) * 2, rng.normal(size=(20_000, 6)) * 2

    def f(v, u=unit):
        return np.asarray(u(v, x))

    assert count_firm_violations(f, a, b) == 0
    uncapped = dense_unit(6, 10, alpha, max_norm=None)
    kernel = unit.kernel.numpy() * 1.5
    uncapped.kernel.assign(kernel)
    uncapped.injection_kernel.assign(unit.injection_kernel.numpy())
    assert np.linalg.norm(uncapped.kernel.numpy(), 2) == pytest.approx(1.5)
    assert count_firm_violations(lambda v: np.asarray(uncapped(v, x)), a, b) > 1000


@pytest.mark.float64
def test_capped_conv_unit_is_firmly_nonexpansive():
    rng = np.random.default_rng(4)
    unit = OptEqConvUnit(
        6, kernel_initializer=keras.initializers.RandomNormal(0, 2.0), dtype="float64"
    )
    unit.build((None, 6, 6, 3), (None, 6, 6, 3))
    x = np.repeat(rng.normal(size=(1, 6, 6, 3)), 1000, axis=0)
    a, b = rng.normal(size=(2, 1000, 6, 6, 3))
    assert count_firm_violations(lambda v: np.asarray(unit(v, x)), a, b) == 0


@pytest.mark.float64
def test_fixed_point_minimizes_the_convex_objective_of_eq4():
    """ReLU, invertible 6x6 W with ||W|| = 0.8: z* minimizes phi over feasible points."""
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(6, 6))
    kernel *= 0.8 / np.linalg.norm(kernel, 2)
    c = rng.normal(size=6)  # U x + b
    unit = dense_unit(6, 6, 1.0, (kernel, np.zeros((6, 6)), c))
    z_star = iterate(lambda z: unit(z, ops.zeros((1, 6), F64)), np.zeros((1, 6)), 400)[0]
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


@pytest.mark.float64
def test_max_norm_and_initializer_options():
    big = keras.initializers.RandomNormal(0, 3.0, seed=0)
    loose = dense_unit(5, 5, max_norm=None, kernel_initializer=big)
    tight = dense_unit(5, 5, max_norm=0.5, kernel_initializer=big)
    assert np.linalg.norm(loose.kernel.numpy(), 2) > 5
    assert np.linalg.norm(tight.kernel.numpy(), 2) == pytest.approx(0.5, rel=1e-10)
    assert loose.kernel.constraint is None
    no_injection = dense_unit(5, 5, injection_initializer="zeros")
    assert not np.any(no_injection.injection_kernel.numpy())


def test_units_config_round_trip():
    for layer in (
        OptEqDenseUnit(5, alpha=0.3, learnable_alpha=True, max_norm=None),
        OptEqConvUnit(5, kernel_size=5, activation="tanh"),
    ):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
