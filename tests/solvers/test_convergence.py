"""Every solver reaches its tolerance, agrees with independent references, and
reports honestly when it cannot solve a map."""

import numpy as np
import pytest
import tensorflow as tf

from .helpers import (
    SOLVER_NAMES,
    LinearMap,
    TanhMap,
    assert_result_shapes,
    matrix_with_norm,
    matrix_with_spectral_radius,
    rng,
    solver,
    symmetric_with_spectrum,
    true_residuals,
)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_reaches_tol_on_tanh_contraction(name, stop_mode):
    n, batch, tol = 12, 6, 1e-9
    f = TanhMap(n, batch, norm=0.5, seed=3)
    result = solver(name)(
        f, tf.zeros([batch, n], tf.float64), max_iter=100, tol=tol, stop_mode=stop_mode
    )
    assert_result_shapes(result, batch)
    assert bool(tf.reduce_all(result.converged))
    reported = result.rel_residual if stop_mode == "rel" else result.abs_residual
    assert np.all(reported.numpy() <= tol)
    assert int(result.steps) < 100
    # ||z - z*|| <= ||f(z) - z|| / (1 - 0.5) for a 0.5-contraction; ||f(z)|| <= sqrt(n).
    bound = 2 * tol * (np.sqrt(n) + 1) if stop_mode == "rel" else 2 * tol
    err = np.linalg.norm(result.state.numpy() - f.reference(), axis=1)
    assert np.all(err <= bound), (err, bound)
    # The reported residuals are those of the returned state.
    abs_res, rel_res = true_residuals(f, result.state)
    np.testing.assert_allclose(result.abs_residual.numpy(), abs_res, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(result.rel_residual.numpy(), rel_res, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_linear_contraction_matches_linalg_solve(name):
    n, batch, tol = 10, 5, 1e-10
    f = LinearMap(matrix_with_norm(n, 0.5, seed=7), rng(8).standard_normal((batch, n)))
    result = solver(name)(f, tf.zeros([batch, n], tf.float64), max_iter=200, tol=tol)
    assert bool(tf.reduce_all(result.converged))
    assert np.all(result.rel_residual.numpy() <= tol)
    ref = f.reference()
    # ||z - z*|| <= rel * ||f(z)|| / (1 - 0.5)
    bound = 2 * tol * (np.linalg.norm(ref, axis=1) * 1.01 + 1e-8)
    err = np.linalg.norm(result.state.numpy() - ref, axis=1)
    assert np.all(err <= bound), (err, bound)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_accelerated_solvers_beat_picard_on_slow_contraction(name):
    # Symmetric map with spectrum spread over [-0.95, 0.95]: Picard contracts at 0.95.
    n, batch, tol = 16, 4, 1e-6
    f = LinearMap(
        symmetric_with_spectrum(np.linspace(-0.95, 0.95, n), seed=0),
        rng(1).standard_normal((batch, n)),
    )
    z0 = tf.zeros([batch, n], tf.float64)
    picard = solver("fixed_point")(f, z0, max_iter=1000, tol=tol)
    fast = solver(name)(f, z0, max_iter=1000, tol=tol)
    assert bool(tf.reduce_all(picard.converged))
    assert bool(tf.reduce_all(fast.converged))
    assert int(picard.steps) >= 3 * int(fast.steps), (int(picard.steps), int(fast.steps))
    # Picard's count is the textbook one: about log(tol) / log(0.95) iterations.
    assert int(picard.steps) > 200
    ref = f.reference()
    bound = 20 * tol * np.linalg.norm(ref, axis=1)  # 1 / (1 - 0.95) = 20
    assert np.all(np.linalg.norm(fast.state.numpy() - ref, axis=1) <= bound)


def test_broyden_solves_expansive_linear_map_where_picard_diverges():
    n, batch, max_iter = 8, 4, 60
    a = matrix_with_spectral_radius(n, 1.5, seed=0)
    f = LinearMap(a, rng(2).standard_normal((batch, n)))
    z0 = tf.zeros([batch, n], tf.float64)
    result = solver("broyden")(f, z0, max_iter=max_iter, tol=1e-12)
    assert bool(tf.reduce_all(result.converged))
    np.testing.assert_allclose(result.state.numpy(), f.reference(), rtol=0, atol=1e-8)

    picard = solver("fixed_point")(f, z0, max_iter=max_iter, tol=1e-12)
    assert not np.any(picard.converged.numpy())
    assert np.all(picard.rel_residual.numpy() > 1e-3)
    assert int(picard.steps) == max_iter


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_map_without_fixed_point_is_reported_unconverged(name, stop_mode):
    # z -> z + 1 has no fixed point: ||f(z) - z|| = sqrt(n) everywhere.
    n, batch, max_iter, tol = 4, 3, 15, 1e-6
    calls = []

    def f(z):
        calls.append(1)
        return z + 1.0

    result = solver(name)(
        f, tf.zeros([batch, n], tf.float64), max_iter=max_iter, tol=tol, stop_mode=stop_mode
    )
    assert not np.any(result.converged.numpy())
    np.testing.assert_allclose(result.abs_residual.numpy(), np.sqrt(n), rtol=1e-9)
    assert np.all(result.abs_residual.numpy() > tol)
    assert np.all(result.rel_residual.numpy() > tol)
    assert int(result.steps) == max_iter == len(calls)
    assert np.all(np.isfinite(result.state.numpy()))


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_picard_on_expanding_map_reports_unconverged(stop_mode):
    # z -> 2z + 1: fixed point -1, but Picard moves away from it geometrically.
    n, batch, max_iter = 3, 2, 20
    result = solver("fixed_point")(
        lambda z: 2.0 * z + 1.0,
        tf.zeros([batch, n], tf.float64),
        max_iter=max_iter,
        tol=1e-6,
        stop_mode=stop_mode,
    )
    assert not np.any(result.converged.numpy())
    assert int(result.steps) == max_iter
    # Iterates z_k = 2^k - 1, k < max_iter: ||f(z_k) - z_k|| = 2^k sqrt(n) grows, so the
    # best is z_0 = 0 in both modes. The relative residual 2^k / (2^(k+1) - 1) shrinks
    # towards 1/2, so ranking by it (as before issue 12) returned the diverged last
    # iterate z_19 = 524287 with either stop mode "rel".
    k = 0
    np.testing.assert_array_equal(result.state.numpy(), 2.0**k - 1)
    np.testing.assert_allclose(result.abs_residual.numpy(), 2.0**k * np.sqrt(n))
    np.testing.assert_allclose(result.rel_residual.numpy(), 2.0**k / (2.0 ** (k + 1) - 1))
    assert np.all(result.rel_residual.numpy() > 0.49)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_sample_easy_and_hard(name):
    # Sample 1 has no fixed point (z -> z + 1); the others are a tanh contraction.
    n, batch, tol = 6, 3, 1e-8
    g = TanhMap(n, batch, norm=0.5, seed=5)
    hard = tf.constant([[False], [True], [False]])

    def f(z):
        return tf.where(hard, z + 1.0, g(z))

    z0 = tf.zeros([batch, n], tf.float64)
    result = solver(name)(f, z0, max_iter=40, tol=tol)
    assert_result_shapes(result, batch)
    np.testing.assert_array_equal(result.converged.numpy(), [True, False, True])
    assert int(result.steps) == 40  # the hard sample keeps the batch going
    rel = result.rel_residual.numpy()
    assert rel[0] <= tol and rel[2] <= tol
    np.testing.assert_allclose(result.abs_residual.numpy()[1], np.sqrt(n), rtol=1e-9)
    state = result.state.numpy()
    ref = g.reference()
    bound = 2 * tol * (np.sqrt(n) + 1)
    assert np.linalg.norm(state[0] - ref[0]) <= bound
    assert np.linalg.norm(state[2] - ref[2]) <= bound
    # An easy sample gets the same answer as when solved in a batch of easy samples.
    alone = solver(name)(g, z0, max_iter=40, tol=tol)
    np.testing.assert_allclose(state[[0, 2]], alone.state.numpy()[[0, 2]], atol=4 * bound)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_already_at_fixed_point_takes_one_step(name):
    f = TanhMap(5, 3, norm=0.5, seed=11)
    z_star = tf.constant(f.reference())
    result = solver(name)(f, z_star, max_iter=50, tol=1e-10)
    assert int(result.steps) == 1
    assert bool(tf.reduce_all(result.converged))
    np.testing.assert_array_equal(result.state.numpy(), z_star.numpy())
