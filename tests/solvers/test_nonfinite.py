"""NaN / Inf in one sample must not spoil the others, nor be returned as a state."""

import numpy as np
import pytest
import tensorflow as tf

from .helpers import SOLVER_NAMES, TanhMap, solver, true_residuals

BAD = 1  # index of the sample whose map blows up


def _map_with_a_bad_sample(bad_value, batch=4, n=5):
    """Good samples: a tanh contraction. Sample BAD: z -> 0.5 z + 1 (fixed point 2),
    except that f returns `bad_value` once the first entry exceeds 1.5, which every
    solver reaches on its way to 2."""
    good = TanhMap(n, batch, norm=0.5, seed=8)
    is_bad = tf.constant([[b == BAD] for b in range(batch)])

    def f(z):
        blown = tf.logical_and(is_bad, z[:, :1] > 1.5)
        bad_sample = tf.where(blown, tf.cast(bad_value, z.dtype), 0.5 * z + 1.0)
        return tf.where(is_bad, bad_sample, good(z))

    return f, good


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("run_as", ["eager", "graph"])
def test_non_finite_sample_does_not_spoil_the_batch(name, bad_value, run_as):
    batch, n, tol = 4, 5, 1e-9
    f, good = _map_with_a_bad_sample(bad_value, batch, n)

    def run(z0):
        return solver(name)(f, z0, max_iter=60, tol=tol)

    if run_as == "graph":
        run = tf.function(run)
    result = run(tf.zeros([batch, n], tf.float64))
    state = result.state.numpy()
    converged = result.converged.numpy()
    others = [b for b in range(batch) if b != BAD]

    assert np.all(np.isfinite(state)), "the bad sample must return its best finite iterate"
    assert not converged[BAD]
    assert np.all(converged[others])
    assert np.all(result.rel_residual.numpy()[others] <= tol)
    ref = good.reference()
    bound = 2 * tol * (np.sqrt(n) + 1)
    assert np.all(np.linalg.norm(state[others] - ref[others], axis=1) <= bound)
    # The bad sample's state is a real iterate (entry 0 <= 1.5, where f is finite)
    # and its reported residuals are the true ones of that state.
    assert state[BAD, 0] <= 1.5
    abs_res, rel_res = true_residuals(f, result.state)
    np.testing.assert_allclose(result.abs_residual.numpy(), abs_res, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(result.rel_residual.numpy(), rel_res, rtol=1e-9, atol=1e-300)
    assert abs_res[BAD] > tol


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_sample_never_finite_reports_inf_and_keeps_z0(name):
    # f is NaN everywhere for sample 0: its residual is inf and it keeps z0.
    good = TanhMap(3, 2, seed=1)
    mask = tf.constant([[True], [False]])

    def f(z):
        return tf.where(mask, tf.constant(np.nan, z.dtype), good(z))

    z0 = tf.constant(np.full((2, 3), 0.25))
    result = solver(name)(f, z0, max_iter=30, tol=1e-8)
    assert not bool(result.converged[0]) and bool(result.converged[1])
    np.testing.assert_array_equal(result.state.numpy()[0], 0.25)
    assert np.isinf(result.abs_residual.numpy()[0]) and np.isinf(result.rel_residual.numpy()[0])
    assert np.isfinite(result.abs_residual.numpy()[1])


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_all_samples_blow_up_stops_early(name):
    # Once every unconverged sample's next iterate is non-finite there is nothing
    # left to do: the solver stops before max_iter and reports failure.
    def f(z):
        return tf.where(z[:, :1] > 1.5, tf.constant(np.nan, z.dtype), 0.5 * z + 1.0)

    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    result = solver(name)(counted, tf.zeros([3, 2], tf.float64), max_iter=50, tol=1e-12)
    assert not np.any(result.converged.numpy())
    assert int(result.steps) == len(calls) < 50
    assert np.all(np.isfinite(result.state.numpy()))


def test_anderson_huge_finite_residual_in_one_float32_sample():
    # Sample 1 has no fixed point and a residual of norm ~1.4e19: finite in float32,
    # but its squared norm overflows the float32 Gram matrix. Sample 0 must still
    # converge, and the solver must not raise.
    def f(z):
        return tf.where(tf.constant([[False], [True]]), z + 7e18, 0.5 * z + 1.0)

    result = solver("anderson")(f, tf.zeros([2, 4], tf.float32), max_iter=40, tol=1e-6)
    assert bool(result.converged[0])
    np.testing.assert_allclose(result.state.numpy()[0], 2.0, rtol=1e-5)
    assert np.all(np.isfinite(result.state.numpy()))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nan_in_z0_for_one_sample(name):
    # A NaN start for one sample gives a NaN residual; others solve normally.
    good = TanhMap(3, 2, seed=2)
    z0 = np.zeros((2, 3))
    z0[0, 1] = np.nan
    result = solver(name)(good, tf.constant(z0), max_iter=40, tol=1e-8)
    assert not bool(result.converged[0]) and bool(result.converged[1])
    np.testing.assert_allclose(result.state.numpy()[1], good.reference()[1], atol=1e-7)
