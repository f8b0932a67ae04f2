"""Anderson acceleration against a dense numpy implementation of its documented math."""

import numpy as np
import pytest
from keras import ops

from keras_deq.solvers import anderson, fixed_point

from .helpers import (
    FLOAT_DTYPES,
    LinearMap,
    Recorder,
    TanhMap,
    anderson_np,
    const,
    picard_np,
    rng,
    true_residuals,
)


@pytest.mark.float64
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
        np.zeros((4, 6)),
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_window_one_is_damped_picard(beta, dtype):
    # With a single iterate in the window alpha = [1]: z <- z + beta (f(z) - z).
    # float32: each step rounds by a few 1.2e-7, and the 0.8-contraction keeps the
    # accumulated error below about 8 * 1.2e-7 / (1 - 0.8) = 5e-6.
    rtol, atol = {"float64": (1e-12, 1e-14), "float32": (1e-5, 1e-5)}[dtype]
    g = TanhMap(5, 3, norm=0.8, seed=4)
    f = Recorder(g)
    z0 = np.zeros((3, 5), dtype)
    anderson(f, z0, max_iter=10, tol=1e-300, window=1, beta=beta)
    expected = picard_np(g.np, np.zeros((3, 5)), 9, damping=beta)
    for got, want in zip(f.inputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    picard = fixed_point(g, z0, max_iter=10, tol=1e-300, damping=beta)
    mixed = anderson(g, z0, max_iter=10, tol=1e-300, window=1, beta=beta)
    np.testing.assert_allclose(
        np.asarray(mixed.state), np.asarray(picard.state), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_beta_changes_the_first_step(dtype):
    # The first step mixes only z0: z1 = z0 + beta * (f(z0) - z0). In float32,
    # c - 0.9 c (beta = 0.1) loses a factor 10 to cancellation: 10 * 2 * 1.2e-7.
    rtol = {"float64": 1e-15, "float32": 1e-5}[dtype]
    c = np.array([[2.0, -4.0]])
    for beta in (1.0, 0.5, 0.1):
        f = Recorder(lambda z: const(c, z) + 0.0 * z)
        anderson(f, np.zeros((1, 2), dtype), max_iter=2, tol=1e-300, beta=beta)
        np.testing.assert_allclose(f.inputs[1], beta * c, rtol=rtol)


@pytest.mark.float64
def test_linear_map_with_window_above_dimension():
    # On a 4-dim linear map a window of 6 spans the whole space: Anderson solves it
    # far faster than Picard, whose rate here is 0.9 (about 220 steps to 1e-10).
    n, batch = 4, 3
    f = LinearMap(0.9 * np.diag([1.0, -1.0, 0.5, 0.2]), rng(1).standard_normal((batch, n)))
    result = anderson(f, np.zeros((batch, n)), max_iter=300, tol=1e-10, window=6)
    assert np.all(np.asarray(result.converged))
    assert int(result.steps) <= 30
    np.testing.assert_allclose(np.asarray(result.state), f.reference(), atol=1e-8)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_map_converges_without_nan(dtype):
    # f(z) = c: the residual is exactly 0 after one step and the Gram matrix is
    # singular (a zero row): the solver must still return c, finite.
    c = rng(0).standard_normal((3, 4)).astype(dtype)
    result = anderson(lambda z: const(c, z) + 0.0 * z, np.zeros((3, 4), dtype), tol=1e-12)
    assert np.all(np.asarray(result.converged))
    assert int(result.steps) == 2
    np.testing.assert_array_equal(np.asarray(result.state), c)
    np.testing.assert_array_equal(np.asarray(result.abs_residual), 0.0)


@pytest.mark.float64
@pytest.mark.parametrize("n", [1, 3])
def test_singular_least_squares_without_ridge_takes_a_plain_step(n):
    # ridge=0 is allowed. On a linear map with window > n the residual history is
    # linearly dependent, so the Gram matrix is exactly or numerically singular. The
    # docstring promises a plain step in that case, not an error and not NaN.
    def f(z):
        return 0.5 * z + 1.0

    # Even plain steps (rate 0.5) reach 1e-8 well within 100 iterations.
    result = anderson(f, np.zeros((2, n)), max_iter=100, tol=1e-8, ridge=0.0)
    state = np.asarray(result.state)
    assert np.all(np.isfinite(state))
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(state, 2.0, atol=1e-7)


# z -> z + 1 has |z| <= 10 after 10 steps, so (z + 1) - z is 1 within 10 ulp(1).
DUPLICATE_RTOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_duplicate_history_without_ridge_does_not_crash(dtype):
    # z -> z + 1 gives the same residual every step: a rank-one Gram matrix.
    def f(z):
        return z + 1.0

    z0 = np.zeros((2, 3), dtype)
    result = anderson(f, z0, max_iter=10, tol=1e-6, stop_mode="abs", ridge=0.0)
    assert np.all(np.isfinite(np.asarray(result.state)))
    assert not np.any(np.asarray(result.converged))
    abs_res, _ = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=DUPLICATE_RTOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_duplicate_history_with_default_ridge(dtype):
    def f(z):
        return z + 1.0

    result = anderson(f, np.zeros((2, 3), dtype), max_iter=10, tol=1e-6)
    assert np.all(np.isfinite(np.asarray(result.state)))
    assert not np.any(np.asarray(result.converged))
    assert int(result.steps) == 10
    np.testing.assert_allclose(
        np.asarray(result.abs_residual), np.sqrt(3.0), rtol=DUPLICATE_RTOL[dtype]
    )


def test_docstring_example():
    result = anderson(lambda z: 0.9 * ops.tanh(z) + 1.0, ops.zeros((4, 8)))
    assert np.all(np.asarray(result.converged))
    assert np.all(np.asarray(result.rel_residual) <= 1e-4)
