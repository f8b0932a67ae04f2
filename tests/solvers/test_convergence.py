"""Every solver reaches its tolerance, agrees with independent references, and
reports honestly when it cannot solve a map."""

import numpy as np
import pytest
from keras import ops

from .helpers import (
    FLOAT_DTYPES,
    SOLVER_NAMES,
    LinearMap,
    Recorder,
    TanhMap,
    assert_result_shapes,
    matrix_with_norm,
    matrix_with_spectral_radius,
    rng,
    solver,
    symmetric_with_spectrum,
    true_residuals,
)

# Tolerances reachable in each precision (float32 residuals bottom out near 1e-7).
TOL = {"float64": 1e-9, "float32": 1e-5}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_reaches_tol_on_tanh_contraction(name, stop_mode, dtype):
    n, batch, tol = 12, 6, TOL[dtype]
    f = TanhMap(n, batch, norm=0.5, seed=3)
    z0 = np.zeros((batch, n), dtype)
    result = solver(name)(f, z0, max_iter=100, tol=tol, stop_mode=stop_mode)
    assert_result_shapes(result, batch)
    assert np.all(np.asarray(result.converged))
    reported = result.rel_residual if stop_mode == "rel" else result.abs_residual
    assert np.all(np.asarray(reported) <= tol)
    assert int(result.steps) < 100
    # ||z - z*|| <= ||f(z) - z|| / (1 - 0.5) for a 0.5-contraction; ||f(z)|| <= sqrt(n).
    bound = 2 * tol * (np.sqrt(n) + 1) if stop_mode == "rel" else 2 * tol
    err = np.linalg.norm(np.asarray(result.state) - f.reference(), axis=1)
    assert np.all(err <= bound), (err, bound)
    # The reported residuals are those of the returned state. In float32, f(state)
    # evaluated again (eagerly, or by another compiled program) may round differently:
    # ||f(z) - z|| moves by at most about sqrt(n) * 4 * 1.2e-7 = 1.7e-6 (||f(z)|| > 1).
    atol = {"float64": 1e-15, "float32": 4e-6}[dtype]
    abs_res, rel_res = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(np.asarray(result.rel_residual), rel_res, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_linear_contraction_matches_linalg_solve(name, dtype):
    n, batch, tol = 10, 5, {"float64": 1e-10, "float32": 1e-5}[dtype]
    f = LinearMap(matrix_with_norm(n, 0.5, seed=7), rng(8).standard_normal((batch, n)))
    result = solver(name)(f, np.zeros((batch, n), dtype), max_iter=200, tol=tol)
    assert np.all(np.asarray(result.converged))
    assert np.all(np.asarray(result.rel_residual) <= tol)
    ref = f.reference()
    # ||z - z*|| <= rel * ||f(z)|| / (1 - 0.5)
    bound = 2 * tol * (np.linalg.norm(ref, axis=1) * 1.01 + 1e-8)
    err = np.linalg.norm(np.asarray(result.state) - ref, axis=1)
    assert np.all(err <= bound), (err, bound)


@pytest.mark.float64
@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_accelerated_solvers_beat_picard_on_slow_contraction(name):
    # Symmetric map with spectrum spread over [-0.95, 0.95]: Picard contracts at 0.95.
    n, batch, tol = 16, 4, 1e-6
    f = LinearMap(
        symmetric_with_spectrum(np.linspace(-0.95, 0.95, n), seed=0),
        rng(1).standard_normal((batch, n)),
    )
    z0 = np.zeros((batch, n))
    picard = solver("fixed_point")(f, z0, max_iter=1000, tol=tol)
    fast = solver(name)(f, z0, max_iter=1000, tol=tol)
    assert np.all(np.asarray(picard.converged))
    assert np.all(np.asarray(fast.converged))
    assert int(picard.steps) >= 3 * int(fast.steps), (int(picard.steps), int(fast.steps))
    # Picard's count is the textbook one: about log(tol) / log(0.95) iterations.
    assert int(picard.steps) > 200
    ref = f.reference()
    bound = 20 * tol * np.linalg.norm(ref, axis=1)  # 1 / (1 - 0.95) = 20
    assert np.all(np.linalg.norm(np.asarray(fast.state) - ref, axis=1) <= bound)


@pytest.mark.float64
def test_broyden_solves_expansive_linear_map_where_picard_diverges():
    n, batch, max_iter = 8, 4, 60
    a = matrix_with_spectral_radius(n, 1.5, seed=0)
    f = LinearMap(a, rng(2).standard_normal((batch, n)))
    z0 = np.zeros((batch, n))
    result = solver("broyden")(f, z0, max_iter=max_iter, tol=1e-12)
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), f.reference(), rtol=0, atol=1e-8)

    picard = solver("fixed_point")(f, z0, max_iter=max_iter, tol=1e-12)
    assert not np.any(np.asarray(picard.converged))
    assert np.all(np.asarray(picard.rel_residual) > 1e-3)
    assert int(picard.steps) == max_iter


# Maps z -> z + 1 below: after k <= 40 steps |z| <= 40, so (z + 1) - z is 1 within
# 40 ulp(1) in float32.
SHIFT_RTOL = {"float64": 1e-9, "float32": 1e-5}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_map_without_fixed_point_is_reported_unconverged(name, stop_mode, dtype):
    # z -> z + 1 has no fixed point: ||f(z) - z|| = sqrt(n) everywhere.
    n, batch, max_iter, tol = 4, 3, 15, 1e-6
    f = Recorder(lambda z: z + 1.0)
    z0 = np.zeros((batch, n), dtype)
    result = solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    assert not np.any(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.abs_residual), np.sqrt(n), rtol=SHIFT_RTOL[dtype])
    assert np.all(np.asarray(result.abs_residual) > tol)
    assert np.all(np.asarray(result.rel_residual) > tol)
    assert int(result.steps) == max_iter == f.calls
    assert np.all(np.isfinite(np.asarray(result.state)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_picard_on_expanding_map_reports_unconverged(stop_mode, dtype):
    # z -> 2z + 1: fixed point -1, but Picard moves away from it geometrically. The
    # iterates are integers below 2^20, exact in either precision.
    n, batch, max_iter = 3, 2, 20
    result = solver("fixed_point")(
        lambda z: 2.0 * z + 1.0,
        np.zeros((batch, n), dtype),
        max_iter=max_iter,
        tol=1e-6,
        stop_mode=stop_mode,
    )
    assert not np.any(np.asarray(result.converged))
    assert int(result.steps) == max_iter
    # Iterates z_k = 2^k - 1, k < max_iter: ||f(z_k) - z_k|| = 2^k sqrt(n) grows, so the
    # best is z_0 = 0 in both modes. The relative residual 2^k / (2^(k+1) - 1) shrinks
    # towards 1/2, so ranking by it (as before issue 12) returned the diverged last
    # iterate z_19 = 524287 with either stop mode "rel".
    k = 0
    np.testing.assert_array_equal(np.asarray(result.state), 2.0**k - 1)
    np.testing.assert_allclose(np.asarray(result.abs_residual), 2.0**k * np.sqrt(n))
    np.testing.assert_allclose(np.asarray(result.rel_residual), 2.0**k / (2.0 ** (k + 1) - 1))
    assert np.all(np.asarray(result.rel_residual) > 0.49)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_sample_easy_and_hard(name, dtype):
    # Sample 1 has no fixed point (z -> z + 1); the others are a tanh contraction.
    n, batch, tol = 6, 3, {"float64": 1e-8, "float32": 1e-5}[dtype]
    g = TanhMap(n, batch, norm=0.5, seed=5)
    hard = np.array([[False], [True], [False]])

    def f(z):
        return ops.where(hard, z + 1.0, g(z))

    z0 = np.zeros((batch, n), dtype)
    result = solver(name)(f, z0, max_iter=40, tol=tol)
    assert_result_shapes(result, batch)
    np.testing.assert_array_equal(np.asarray(result.converged), [True, False, True])
    assert int(result.steps) == 40  # the hard sample keeps the batch going
    rel = np.asarray(result.rel_residual)
    assert rel[0] <= tol and rel[2] <= tol
    np.testing.assert_allclose(
        np.asarray(result.abs_residual)[1], np.sqrt(n), rtol=SHIFT_RTOL[dtype]
    )
    state = np.asarray(result.state)
    ref = g.reference()
    bound = 2 * tol * (np.sqrt(n) + 1)
    assert np.linalg.norm(state[0] - ref[0]) <= bound
    assert np.linalg.norm(state[2] - ref[2]) <= bound
    # An easy sample gets the same answer as when solved in a batch of easy samples.
    alone = solver(name)(g, z0, max_iter=40, tol=tol)
    np.testing.assert_allclose(state[[0, 2]], np.asarray(alone.state)[[0, 2]], atol=4 * bound)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_already_at_fixed_point_takes_one_step(name, dtype):
    f = TanhMap(5, 3, norm=0.5, seed=11)
    z_star = f.reference().astype(dtype)  # rounded to float32: a fixed point to ~1e-7
    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    result = solver(name)(f, z_star, max_iter=50, tol=tol)
    assert int(result.steps) == 1
    assert np.all(np.asarray(result.converged))
    np.testing.assert_array_equal(np.asarray(result.state), z_star)
