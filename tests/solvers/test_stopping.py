"""Iteration budget, early stopping, best-iterate bookkeeping and stop modes.

The eager-mode `Recorder` sees every state the solver evaluates `f` at; the
residuals of those states, recomputed in numpy, are the ground truth for what
the solver must return.
"""

import numpy as np
import pytest
import tensorflow as tf

from .helpers import (
    SOLVER_NAMES,
    Recorder,
    TanhMap,
    matrix_with_norm,
    residuals_np,
    rng,
    solver,
    true_residuals,
)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", [1, 2, 7])
def test_never_evaluates_f_more_than_max_iter(name, max_iter):
    f = Recorder(TanhMap(6, 3, norm=0.9, seed=0))
    result = solver(name)(f, tf.zeros([3, 6], tf.float64), max_iter=max_iter, tol=1e-14)
    assert f.calls == int(result.steps) == max_iter


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_counts_evaluations_in_graph_mode(name):
    counter = tf.Variable(0, dtype=tf.int32)
    g = TanhMap(6, 3, norm=0.9, seed=0)

    def f(z):
        counter.assign_add(1)
        return g(z)

    @tf.function
    def run(z0, max_iter, tol):
        return solver(name)(f, z0, max_iter=max_iter, tol=tol)

    z0 = tf.zeros([3, 6], tf.float64)
    result = run(z0, 9, 1e-14)
    assert int(counter.numpy()) == int(result.steps) == 9
    counter.assign(0)
    result = run(z0, 500, 1e-8)
    assert 1 < int(counter.numpy()) == int(result.steps) < 500
    assert bool(tf.reduce_all(result.converged))


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_stops_as_soon_as_whole_batch_meets_tol(name, stop_mode):
    tol = 1e-7
    f = Recorder(TanhMap(8, 5, norm=0.8, seed=4))
    result = solver(name)(
        f, tf.zeros([5, 8], tf.float64), max_iter=200, tol=tol, stop_mode=stop_mode
    )
    history = f.residual_history(stop_mode)  # (calls, batch)
    best_so_far = np.minimum.accumulate(history, axis=0)
    all_done = np.all(best_so_far <= tol, axis=1)
    # It stopped at the first evaluation after which every sample had met tol.
    assert all_done[-1]
    assert not np.any(all_done[:-1])
    assert f.calls == int(result.steps) < 200
    # Samples that met tol early did not hold the others back nor get worse.
    assert np.all(result.converged.numpy())


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_returns_lowest_residual_iterate(name, stop_mode):
    # A chaotic map: iterates wander and residuals are far from monotone.
    w = matrix_with_norm(5, 1.0, seed=2)
    x = rng(3).standard_normal((6, 5))

    def g(z):
        return 3.0 * tf.sin(tf.matmul(z, tf.constant(w)) + x)

    f = Recorder(g)
    result = solver(name)(
        f, tf.zeros([6, 5], tf.float64), max_iter=12, tol=1e-12, stop_mode=stop_mode
    )
    assert f.calls == int(result.steps) == 12
    # Nothing meets tol=1e-12, so in both modes the lowest absolute residual wins.
    history = f.residual_history("abs")
    assert np.any(np.diff(history, axis=0) > 0), "the test map should make some steps worse"
    best = np.argmin(history, axis=0)  # first minimum per sample, as ties keep the earlier
    expected_state = np.stack([f.inputs[k][b] for b, k in enumerate(best)])
    np.testing.assert_allclose(result.state.numpy(), expected_state, rtol=0, atol=1e-14)
    np.testing.assert_allclose(result.abs_residual.numpy(), history.min(axis=0), rtol=1e-12)
    reported = result.rel_residual if stop_mode == "rel" else result.abs_residual
    # And the reported residuals are the true ones of the returned state.
    abs_res, rel_res = true_residuals(g, result.state)
    np.testing.assert_allclose(result.abs_residual.numpy(), abs_res, rtol=1e-12)
    np.testing.assert_allclose(result.rel_residual.numpy(), rel_res, rtol=1e-12)
    np.testing.assert_array_equal(result.converged.numpy(), reported.numpy() <= 1e-12)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_picard_like_divergence_keeps_the_start(name):
    # f(z) - z = (|z| + 1)^2 >= 1 with equality only at z = 0: no fixed point, and
    # every iterate after z0 = 0 is worse than z0.
    f = Recorder(lambda z: z + (tf.abs(z) + 1.0) ** 2)
    z0 = tf.zeros([2, 3], tf.float64)
    result = solver(name)(f, z0, max_iter=6, tol=1e-6, stop_mode="abs")
    history = f.residual_history("abs")
    assert np.all(history[1:] > history[0])
    np.testing.assert_array_equal(result.state.numpy(), 0.0)
    np.testing.assert_allclose(result.abs_residual.numpy(), np.sqrt(3.0))
    assert not np.any(result.converged.numpy())


class TableMap:
    """A scalar map defined on a few points: f(key_i) = value_i."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def __call__(self, z):
        out = tf.zeros_like(z)
        for k, v in zip(self.keys, self.values, strict=True):
            out = tf.where(tf.abs(z - k) < 0.25, tf.cast(v, z.dtype), out)
        return out


def test_unconverged_iterates_are_ranked_by_absolute_residual_in_both_modes():
    # Picard orbit 98 -> 100 -> 1 -> 0 -> 500 -> 98:
    #   z=98:  |f-z| = 2,   rel = 2/100
    #   z=100: |f-z| = 99,  rel = 99/1
    #   z=1:   |f-z| = 1,   rel = 1/0 (capped at the dtype's largest value)
    #   z=0:   |f-z| = 500, rel = 1
    #   z=500: |f-z| = 402, rel = 402/98
    # Nothing meets tol, so both modes return the lowest absolute residual, z=1
    # (ranking by the relative residual would let a diverging iterate win).
    f = TableMap([98.0, 100.0, 1.0, 0.0, 500.0], [100.0, 1.0, 0.0, 500.0, 98.0])
    z0 = tf.fill([1, 1], tf.constant(98.0, tf.float64))
    by_abs = solver("fixed_point")(f, z0, max_iter=5, tol=1e-3, stop_mode="abs")
    by_rel = solver("fixed_point")(f, z0, max_iter=5, tol=1e-3, stop_mode="rel")
    for result in (by_abs, by_rel):
        assert float(result.state[0, 0]) == 1.0
        np.testing.assert_allclose(result.abs_residual.numpy(), [1.0])
        np.testing.assert_allclose(
            result.rel_residual.numpy(), [1.0 / np.finfo(np.float64).tiny], rtol=1e-12
        )
        assert np.isfinite(result.rel_residual.numpy()).all()
        assert not result.converged.numpy()[0]


def test_rel_mode_returns_first_iterate_meeting_tol_even_if_abs_is_larger():
    # Orbit 98 -> 100 -> 1 -> 0: z=98 has rel 0.02 (meets tol=0.05) but abs 2 > 1 of z=1.
    f = TableMap([98.0, 100.0, 1.0, 0.0], [100.0, 1.0, 0.0, 0.0])
    z0 = tf.fill([1, 1], tf.constant(98.0, tf.float64))
    result = solver("fixed_point")(f, z0, max_iter=4, tol=0.05, stop_mode="rel")
    assert float(result.state[0, 0]) == 98.0
    assert bool(result.converged[0])


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_abs_and_rel_semantics_on_large_states(name):
    # Fixed point of z -> 0.5 z + c is 2c with ||2c|| ~ 1e4 per sample: abs and rel
    # tolerances of the same value are four orders of magnitude apart.
    n, batch, tol = 4, 3, 1e-6
    c = 5000.0 * np.ones((batch, n))
    c[1] *= -1.0

    def f(z):
        return 0.5 * z + c

    z0 = tf.zeros([batch, n], tf.float64)
    rel = solver(name)(f, z0, max_iter=200, tol=tol, stop_mode="rel")
    abs_ = solver(name)(f, z0, max_iter=200, tol=tol, stop_mode="abs")
    for result in (rel, abs_):
        a, r = residuals_np(f(result.state.numpy()), result.state.numpy())
        np.testing.assert_allclose(result.abs_residual.numpy(), a, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(result.rel_residual.numpy(), r, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(r, a / np.linalg.norm(f(result.state.numpy()), axis=1))
    assert np.all(rel.converged.numpy()) and np.all(abs_.converged.numpy())
    assert np.all(rel.rel_residual.numpy() <= tol)
    assert np.all(abs_.abs_residual.numpy() <= tol)
    if name == "fixed_point":
        # Picard halves the residual each step: abs needs ~log2(1e4) more steps.
        assert int(abs_.steps) >= int(rel.steps) + 10
        assert np.all(rel.abs_residual.numpy() > tol)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("factor, expected", [(1.000001, True), (0.999999, False)])
def test_converged_flag_is_residual_at_most_tol(stop_mode, factor, expected):
    # Picard on z -> 0.5 z + 1 from 0: z_k = 2 - 2^(1-k), f(z_k) - z_k = 2^-k per entry.
    # max_iter = 10 stops after evaluating z_9.
    n, k = 4, 9
    z_k = 2.0 - 2.0 ** (1 - k)
    abs_res = 2.0**-k * np.sqrt(n)
    rel_res = abs_res / ((0.5 * z_k + 1.0) * np.sqrt(n))
    residual = abs_res if stop_mode == "abs" else rel_res
    result = solver("fixed_point")(
        lambda z: 0.5 * z + 1.0,
        tf.zeros([1, n], tf.float64),
        max_iter=10,
        tol=residual * factor,
        stop_mode=stop_mode,
    )
    assert int(result.steps) == 10
    np.testing.assert_allclose(result.abs_residual.numpy(), [abs_res], rtol=1e-12)
    np.testing.assert_allclose(result.rel_residual.numpy(), [rel_res], rtol=1e-12)
    assert bool(result.converged[0]) is expected
