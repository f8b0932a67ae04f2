"""NaN / Inf in one sample must not spoil the others, nor be returned as a state."""

import numpy as np
import pytest
from keras import ops

from .helpers import (
    FLOAT_DTYPES,
    SOLVER_NAMES,
    Recorder,
    TanhMap,
    compiled,
    const,
    solver,
    true_residuals,
)

BAD = 1  # index of the sample whose map blows up
# Tolerance of the solves, per dtype (float32 residuals bottom out near 1e-7).
TOL = {"float64": 1e-9, "float32": 1e-5}


def _map_with_a_bad_sample(bad_value, batch=4, n=5):
    """Good samples: a tanh contraction. Sample BAD: z -> 0.5 z + 1 (fixed point 2),
    except that f returns `bad_value` once the first entry exceeds 1.5, which every
    solver reaches on its way to 2."""
    good = TanhMap(n, batch, norm=0.5, seed=8)
    is_bad = np.array([[b == BAD] for b in range(batch)])

    def f(z):
        blown = ops.logical_and(is_bad, z[:, :1] > 1.5)
        bad_sample = ops.where(blown, const(bad_value, z), 0.5 * z + 1.0)
        return ops.where(is_bad, bad_sample, good(z))

    return f, good


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("run_as", ["eager", "compiled"])
def test_non_finite_sample_does_not_spoil_the_batch(name, bad_value, run_as, dtype):
    batch, n, tol = 4, 5, TOL[dtype]
    f, good = _map_with_a_bad_sample(bad_value, batch, n)

    def run(z0):
        return solver(name)(f, z0, max_iter=60, tol=tol)

    if run_as == "compiled":
        run = compiled(run)
    result = run(ops.zeros((batch, n), dtype))
    state = np.asarray(result.state)
    converged = np.asarray(result.converged)
    others = [b for b in range(batch) if b != BAD]

    assert np.all(np.isfinite(state)), "the bad sample must return its best finite iterate"
    assert not converged[BAD]
    assert np.all(converged[others])
    assert np.all(np.asarray(result.rel_residual)[others] <= tol)
    ref = good.reference()
    bound = 2 * tol * (np.sqrt(n) + 1)
    assert np.all(np.linalg.norm(state[others] - ref[others], axis=1) <= bound)
    # The bad sample's state is a real iterate (entry 0 <= 1.5, where f is finite)
    # and its reported residuals are the true ones of that state. In float32, f(state)
    # evaluated again may round differently (by about sqrt(n) * 4 * 1.2e-7).
    rtol, atol = {"float64": (1e-9, 1e-300), "float32": (1e-6, 4e-6)}[dtype]
    assert state[BAD, 0] <= 1.5
    abs_res, rel_res = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(result.rel_residual), rel_res, rtol=rtol, atol=atol)
    assert abs_res[BAD] > tol


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_sample_never_finite_reports_inf_and_keeps_z0(name, dtype):
    # f is NaN everywhere for sample 0: its residual is inf and it keeps z0.
    good = TanhMap(3, 2, seed=1)
    mask = np.array([[True], [False]])

    def f(z):
        return ops.where(mask, const(np.nan, z), good(z))

    z0 = np.full((2, 3), 0.25, dtype)
    result = solver(name)(f, z0, max_iter=30, tol=TOL[dtype])
    converged = np.asarray(result.converged)
    assert not converged[0] and converged[1]
    np.testing.assert_array_equal(np.asarray(result.state)[0], 0.25)
    assert np.isinf(np.asarray(result.abs_residual)[0])
    assert np.isinf(np.asarray(result.rel_residual)[0])
    assert np.isfinite(np.asarray(result.abs_residual)[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_all_samples_blow_up_stops_early(name, dtype):
    # Once every unconverged sample's next iterate is non-finite there is nothing
    # left to do: the solver stops before max_iter and reports failure.
    def f(z):
        return ops.where(z[:, :1] > 1.5, const(np.nan, z), 0.5 * z + 1.0)

    counted = Recorder(f)
    result = solver(name)(counted, np.zeros((3, 2), dtype), max_iter=50, tol=1e-12)
    assert not np.any(np.asarray(result.converged))
    assert int(result.steps) == counted.calls < 50
    assert np.all(np.isfinite(np.asarray(result.state)))


def test_anderson_huge_finite_residual_in_one_float32_sample():
    # Sample 1 has no fixed point and a residual of norm ~1.4e19: finite in float32,
    # but its squared norm overflows the float32 Gram matrix. Sample 0 must still
    # converge, and the solver must not raise.
    def f(z):
        return ops.where(np.array([[False], [True]]), z + 7e18, 0.5 * z + 1.0)

    result = solver("anderson")(f, ops.zeros((2, 4), "float32"), max_iter=40, tol=1e-6)
    assert np.asarray(result.converged)[0]
    np.testing.assert_allclose(np.asarray(result.state)[0], 2.0, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(result.state)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nan_in_z0_for_one_sample(name, dtype):
    # A NaN start for one sample gives a NaN residual; others solve normally.
    good = TanhMap(3, 2, seed=2)
    z0 = np.zeros((2, 3), dtype)
    z0[0, 1] = np.nan
    tol = {"float64": 1e-8, "float32": 1e-5}[dtype]
    result = solver(name)(good, z0, max_iter=40, tol=tol)
    converged = np.asarray(result.converged)
    assert not converged[0] and converged[1]
    np.testing.assert_allclose(np.asarray(result.state)[1], good.reference()[1], atol=10 * tol)
