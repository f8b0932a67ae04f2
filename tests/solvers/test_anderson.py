"""Anderson acceleration against a dense numpy implementation of its documented math."""

import numpy as np
import pytest
import tensorflow as tf

from keras_deq.solvers import anderson, fixed_point

from .helpers import LinearMap, Recorder, TanhMap, anderson_np, picard_np, rng, true_residuals


@pytest.mark.parametrize(
    "window, beta, ridge",
    [(5, 1.0, 1e-4), (3, 0.6, 1e-4), (2, 1.0, 1e-2), (8, 0.8, 1e-6)],
)
def test_iterates_match_numpy_reference(window, beta, ridge):
    g = TanhMap(6, 4, norm=0.9, seed=2)
    f = Recorder(g)
    iters = 14
    anderson(
        f,
        tf.zeros([4, 6], tf.float64),
        max_iter=iters,
        tol=1e-300,
        window=window,
        beta=beta,
        ridge=ridge,
    )
    expected = anderson_np(g.np, np.zeros((4, 6)), iters - 1, window, beta, ridge)
    assert f.calls == iters
    for k, (got, want) in enumerate(zip(f.inputs, expected, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"iterate {k}")


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_window_one_is_damped_picard(beta):
    # With a single iterate in the window alpha = [1]: z <- z + beta (f(z) - z).
    g = TanhMap(5, 3, norm=0.8, seed=4)
    f = Recorder(g)
    anderson(f, tf.zeros([3, 5], tf.float64), max_iter=10, tol=1e-300, window=1, beta=beta)
    expected = picard_np(g.np, np.zeros((3, 5)), 9, damping=beta)
    for got, want in zip(f.inputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    picard = fixed_point(g, tf.zeros([3, 5], tf.float64), max_iter=10, tol=1e-300, damping=beta)
    np.testing.assert_allclose(
        anderson(
            g, tf.zeros([3, 5], tf.float64), max_iter=10, tol=1e-300, window=1, beta=beta
        ).state.numpy(),
        picard.state.numpy(),
        rtol=1e-12,
    )


def test_beta_changes_the_first_step():
    # The first step mixes only z0: z1 = z0 + beta * (f(z0) - z0).
    c = np.array([[2.0, -4.0]])
    for beta in (1.0, 0.5, 0.1):
        f = Recorder(lambda z: tf.constant(c) + 0.0 * z)
        anderson(f, tf.zeros([1, 2], tf.float64), max_iter=2, tol=1e-300, beta=beta)
        np.testing.assert_allclose(f.inputs[1], beta * c, rtol=1e-15)


def test_linear_map_with_window_above_dimension():
    # On a 4-dim linear map a window of 6 spans the whole space: Anderson solves it
    # far faster than Picard, whose rate here is 0.9 (about 220 steps to 1e-10).
    n, batch = 4, 3
    f = LinearMap(0.9 * np.diag([1.0, -1.0, 0.5, 0.2]), rng(1).standard_normal((batch, n)))
    result = anderson(f, tf.zeros([batch, n], tf.float64), max_iter=300, tol=1e-10, window=6)
    assert bool(tf.reduce_all(result.converged))
    assert int(result.steps) <= 30
    np.testing.assert_allclose(result.state.numpy(), f.reference(), atol=1e-8)


def test_constant_map_converges_without_nan():
    # f(z) = c: the residual is exactly 0 after one step and the Gram matrix is
    # singular (a zero row): the solver must still return c, finite.
    c = rng(0).standard_normal((3, 4))
    result = anderson(lambda z: tf.constant(c) + 0.0 * z, tf.zeros([3, 4], tf.float64), tol=1e-12)
    assert bool(tf.reduce_all(result.converged))
    assert int(result.steps) == 2
    np.testing.assert_array_equal(result.state.numpy(), c)
    np.testing.assert_array_equal(result.abs_residual.numpy(), 0.0)


@pytest.mark.parametrize("n", [1, 3])
def test_singular_least_squares_without_ridge_takes_a_plain_step(n):
    # ridge=0 is allowed. On a linear map with window > n the residual history is
    # linearly dependent, so the Gram matrix is exactly or numerically singular. The
    # docstring promises a plain step in that case, not an error and not NaN.
    def f(z):
        return 0.5 * z + 1.0

    # Even plain steps (rate 0.5) reach 1e-8 well within 100 iterations.
    result = anderson(f, tf.zeros([2, n], tf.float64), max_iter=100, tol=1e-8, ridge=0.0)
    state = result.state.numpy()
    assert np.all(np.isfinite(state))
    assert bool(tf.reduce_all(result.converged))
    np.testing.assert_allclose(state, 2.0, atol=1e-7)


def test_duplicate_history_without_ridge_does_not_crash():
    # z -> z + 1 gives the same residual every step: a rank-one Gram matrix.
    def f(z):
        return z + 1.0

    result = anderson(
        f, tf.zeros([2, 3], tf.float64), max_iter=10, tol=1e-6, stop_mode="abs", ridge=0.0
    )
    assert np.all(np.isfinite(result.state.numpy()))
    assert not np.any(result.converged.numpy())
    abs_res, _ = true_residuals(f, result.state)
    np.testing.assert_allclose(result.abs_residual.numpy(), abs_res, rtol=1e-12)


def test_duplicate_history_with_default_ridge():
    def f(z):
        return z + 1.0

    result = anderson(f, tf.zeros([2, 3], tf.float64), max_iter=10, tol=1e-6)
    assert np.all(np.isfinite(result.state.numpy()))
    assert not np.any(result.converged.numpy())
    assert int(result.steps) == 10
    np.testing.assert_allclose(result.abs_residual.numpy(), np.sqrt(3.0), rtol=1e-12)


def test_docstring_example():
    result = anderson(lambda z: 0.9 * tf.tanh(z) + 1.0, tf.zeros([4, 8]))
    assert bool(tf.reduce_all(result.converged))
    assert np.all(result.rel_residual.numpy() <= 1e-4)
