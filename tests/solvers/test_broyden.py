"""Broyden's method against a dense numpy implementation of good Broyden."""

import numpy as np
import pytest

from keras_deq.solvers import broyden

from .helpers import (
    FLOAT_DTYPES,
    LinearMap,
    Recorder,
    TanhMap,
    broyden_np,
    const,
    matrix_with_spectral_radius,
    rng,
)


@pytest.mark.float64
@pytest.mark.parametrize("memory", [20, 3])
def test_iterates_match_numpy_reference(memory):
    g = TanhMap(6, 4, norm=1.2, seed=3)
    f = Recorder(g)
    iters = 10
    broyden(f, np.zeros((4, 6)), max_iter=iters, tol=1e-300, memory=memory)
    expected = broyden_np(g.np, np.zeros((4, 6)), iters - 1, memory)
    assert f.calls == iters
    for k, (got, want) in enumerate(zip(f.inputs, expected, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10, err_msg=f"iterate {k}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_first_step_is_picard(dtype):
    g = TanhMap(5, 2, seed=1)
    f = Recorder(g)
    broyden(f, np.zeros((2, 5), dtype), max_iter=2, tol=1e-300)
    # float32: f(z0) itself is computed in float32 (a few roundings of 1.2e-7).
    rtol = {"float64": 1e-15, "float32": 1e-6}[dtype]
    np.testing.assert_allclose(f.inputs[1], g.np(np.zeros((2, 5))), rtol=rtol)


@pytest.mark.float64
@pytest.mark.parametrize("radius", [1.5, 3.0])
def test_expansive_linear_map(radius):
    n, batch = 6, 3
    f = LinearMap(
        matrix_with_spectral_radius(n, radius, seed=4), rng(5).standard_normal((batch, n))
    )
    result = broyden(f, np.zeros((batch, n)), max_iter=40, tol=1e-12)
    assert np.all(np.asarray(result.converged))
    # Good Broyden terminates on an n-dim linear system within 2n steps (Gay 1979).
    assert int(result.steps) <= 2 * n + 1
    np.testing.assert_allclose(np.asarray(result.state), f.reference(), atol=1e-8)


@pytest.mark.float64
def test_scalar_expanding_map_docstring():
    result = broyden(lambda z: 1.5 * z + 1.0, np.zeros((2, 3)), tol=1e-10)
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), -2.0, atol=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_secant_denominator_is_skipped(dtype):
    # A map with constant residual gives y = g_new - g = 0: the update must be
    # skipped (H stays -I, plain Picard steps), with no NaN. The iterates are small
    # integers, exact in either precision.
    f = Recorder(lambda z: z + const([[1.0, 2.0]], z))
    result = broyden(f, np.zeros((1, 2), dtype), max_iter=5, tol=1e-8)
    expected = [k * np.array([[1.0, 2.0]]) for k in range(5)]
    for got, want in zip(f.inputs, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(np.asarray(result.state)))
    assert not np.asarray(result.converged)[0]


@pytest.mark.float64
def test_memory_one_still_converges_on_contraction():
    g = TanhMap(8, 3, norm=0.5, seed=6)
    result = broyden(g, np.zeros((3, 8)), max_iter=60, tol=1e-10, memory=1)
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), g.reference(), atol=1e-9)
