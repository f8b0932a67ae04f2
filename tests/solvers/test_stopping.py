"""Iteration budget, early stopping, best-iterate bookkeeping and stop modes.

The `Recorder` sees every state the solver evaluates `f` at; the residuals of
those states, recomputed in numpy, are the ground truth for what the solver must
return.
"""

import numpy as np
import pytest
from keras import ops

from .helpers import (
    FLOAT_DTYPES,
    SOLVER_NAMES,
    Counter,
    Recorder,
    TanhMap,
    compiled,
    const,
    matrix_with_norm,
    residuals_np,
    rng,
    solver,
    true_residuals,
)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", [1, 2, 7])
def test_never_evaluates_f_more_than_max_iter(name, max_iter, dtype):
    f = Recorder(TanhMap(6, 3, norm=0.9, seed=0))
    result = solver(name)(f, np.zeros((3, 6), dtype), max_iter=max_iter, tol=1e-14)
    assert f.calls == int(result.steps) == max_iter


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_counts_evaluations_when_compiled(name, dtype):
    f = Counter(TanhMap(6, 3, norm=0.9, seed=0))

    def run(max_iter, tol):
        return compiled(lambda z0: solver(name)(f, z0, max_iter=max_iter, tol=tol))

    z0 = ops.zeros((3, 6), dtype)
    result = run(9, 1e-14)(z0)
    assert f.count == int(result.steps) == 9
    f.reset()
    result = run(500, {"float64": 1e-8, "float32": 1e-5}[dtype])(z0)
    assert 1 < f.count == int(result.steps) < 500
    assert np.all(np.asarray(result.converged))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_stops_as_soon_as_whole_batch_meets_tol(name, stop_mode, dtype):
    # The history is recomputed in float64 from the very values the solver saw, so in
    # float32 it can disagree with the solver's own residuals by a few 1.2e-7
    # (relative), which matters only for a residual that close to tol.
    tol = {"float64": 1e-7, "float32": 1e-4}[dtype]
    f = Recorder(TanhMap(8, 5, norm=0.8, seed=4))
    z0 = np.zeros((5, 8), dtype)
    result = solver(name)(f, z0, max_iter=200, tol=tol, stop_mode=stop_mode)
    history = f.residual_history(stop_mode)  # (calls, batch)
    best_so_far = np.minimum.accumulate(history, axis=0)
    all_done = np.all(best_so_far <= tol, axis=1)
    # It stopped at the first evaluation after which every sample had met tol.
    assert all_done[-1]
    assert not np.any(all_done[:-1])
    assert f.calls == int(result.steps) < 200
    # Samples that met tol early did not hold the others back nor get worse.
    assert np.all(np.asarray(result.converged))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_returns_lowest_residual_iterate(name, stop_mode, dtype):
    # A chaotic map: iterates wander and residuals are far from monotone.
    w = matrix_with_norm(5, 1.0, seed=2)
    x = rng(3).standard_normal((6, 5))
    # float32: f(z) may round differently where it is evaluated again (or recomputed
    # inside a compiled loop), by a few 1.2e-7 per entry of |f| <= 3, so a residual
    # moves by up to about sqrt(5) * 4 * 1.2e-7 * 3 = 3.2e-6.
    rtol, atol = {"float64": (1e-12, 0.0), "float32": (1e-5, 4e-6)}[dtype]

    def g(z):
        return 3.0 * ops.sin(ops.matmul(z, const(w, z)) + const(x, z))

    f = Recorder(g)
    z0 = np.zeros((6, 5), dtype)
    result = solver(name)(f, z0, max_iter=12, tol=1e-12, stop_mode=stop_mode)
    assert f.calls == int(result.steps) == 12
    # Nothing meets tol=1e-12, so in both modes the lowest absolute residual wins.
    history = f.residual_history("abs")
    assert np.any(np.diff(history, axis=0) > 0), "the test map should make some steps worse"
    best = np.argmin(history, axis=0)  # first minimum per sample, as ties keep the earlier
    expected_state = np.stack([f.inputs[k][b] for b, k in enumerate(best)])
    np.testing.assert_allclose(np.asarray(result.state), expected_state, rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        np.asarray(result.abs_residual), history.min(axis=0), rtol=rtol, atol=atol
    )
    reported = result.rel_residual if stop_mode == "rel" else result.abs_residual
    # And the reported residuals are the true ones of the returned state.
    abs_res, rel_res = true_residuals(g, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(result.rel_residual), rel_res, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.asarray(result.converged), np.asarray(reported) <= 1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_picard_like_divergence_keeps_the_start(name, dtype):
    # f(z) - z = (|z| + 1)^2 >= 1 with equality only at z = 0: no fixed point, and
    # every iterate after z0 = 0 is worse than z0.
    f = Recorder(lambda z: z + (ops.abs(z) + 1.0) ** 2)
    z0 = np.zeros((2, 3), dtype)
    result = solver(name)(f, z0, max_iter=6, tol=1e-6, stop_mode="abs")
    history = f.residual_history("abs")
    assert np.all(history[1:] > history[0])
    np.testing.assert_array_equal(np.asarray(result.state), 0.0)
    np.testing.assert_allclose(np.asarray(result.abs_residual), np.sqrt(3.0))
    assert not np.any(np.asarray(result.converged))


class TableMap:
    """A scalar map defined on a few points: f(key_i) = value_i."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def __call__(self, z):
        out = ops.zeros_like(z)
        for k, v in zip(self.keys, self.values, strict=True):
            out = ops.where(ops.abs(z - k) < 0.25, const(v, z), out)
        return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unconverged_iterates_are_ranked_by_absolute_residual_in_both_modes(dtype):
    # Picard orbit 98 -> 100 -> 1 -> 0 -> 500 -> 98:
    #   z=98:  |f-z| = 2,   rel = 2/100
    #   z=100: |f-z| = 99,  rel = 99/1
    #   z=1:   |f-z| = 1,   rel = 1/0 (capped at the dtype's largest value)
    #   z=0:   |f-z| = 500, rel = 1
    #   z=500: |f-z| = 402, rel = 402/98
    # Nothing meets tol, so both modes return the lowest absolute residual, z=1
    # (ranking by the relative residual would let a diverging iterate win).
    f = TableMap([98.0, 100.0, 1.0, 0.0, 500.0], [100.0, 1.0, 0.0, 500.0, 98.0])
    z0 = np.full((1, 1), 98.0, dtype)
    by_abs = solver("fixed_point")(f, z0, max_iter=5, tol=1e-3, stop_mode="abs")
    by_rel = solver("fixed_point")(f, z0, max_iter=5, tol=1e-3, stop_mode="rel")
    for result in (by_abs, by_rel):
        assert np.asarray(result.state)[0, 0] == 1.0
        np.testing.assert_allclose(np.asarray(result.abs_residual), [1.0])
        # 1 / tiny, rounded to the dtype (below its largest value, so not capped).
        np.testing.assert_allclose(
            np.asarray(result.rel_residual), [1.0 / np.finfo(dtype).tiny], rtol=1e-12
        )
        assert np.isfinite(np.asarray(result.rel_residual)).all()
        assert not np.asarray(result.converged)[0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rel_mode_returns_first_iterate_meeting_tol_even_if_abs_is_larger(dtype):
    # Orbit 98 -> 100 -> 1 -> 0: z=98 has rel 0.02 (meets tol=0.05) but abs 2 > 1 of z=1.
    f = TableMap([98.0, 100.0, 1.0, 0.0], [100.0, 1.0, 0.0, 0.0])
    z0 = np.full((1, 1), 98.0, dtype)
    result = solver("fixed_point")(f, z0, max_iter=4, tol=0.05, stop_mode="rel")
    assert np.asarray(result.state)[0, 0] == 98.0
    assert np.asarray(result.converged)[0]


@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_abs_and_rel_semantics_on_large_states(name):
    # Fixed point of z -> 0.5 z + c is 2c with ||2c|| ~ 1e4 per sample: abs and rel
    # tolerances of the same value are four orders of magnitude apart.
    n, batch, tol = 4, 3, 1e-6
    c = 5000.0 * np.ones((batch, n))
    c[1] *= -1.0

    def f(z):
        return 0.5 * z + c

    z0 = np.zeros((batch, n))
    rel = solver(name)(f, z0, max_iter=200, tol=tol, stop_mode="rel")
    abs_ = solver(name)(f, z0, max_iter=200, tol=tol, stop_mode="abs")
    for result in (rel, abs_):
        a, r = residuals_np(f(np.asarray(result.state)), np.asarray(result.state))
        np.testing.assert_allclose(np.asarray(result.abs_residual), a, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(np.asarray(result.rel_residual), r, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(r, a / np.linalg.norm(f(np.asarray(result.state)), axis=1))
    assert np.all(np.asarray(rel.converged)) and np.all(np.asarray(abs_.converged))
    assert np.all(np.asarray(rel.rel_residual) <= tol)
    assert np.all(np.asarray(abs_.abs_residual) <= tol)
    if name == "fixed_point":
        # Picard halves the residual each step: abs needs ~log2(1e4) more steps.
        assert int(abs_.steps) >= int(rel.steps) + 10
        assert np.all(np.asarray(rel.abs_residual) > tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("factor, expected", [(1.000001, True), (0.999999, False)])
def test_converged_flag_is_residual_at_most_tol(stop_mode, factor, expected, dtype):
    # Picard on z -> 0.5 z + 1 from 0: z_k = 2 - 2^(1-k), f(z_k) - z_k = 2^-k per entry.
    # max_iter = 10 stops after evaluating z_9. Every value here is exact in float32
    # too, but for the division of the relative residual (one rounding, 6e-8).
    rtol = {"float64": 1e-12, "float32": 1e-6}[dtype]
    n, k = 4, 9
    z_k = 2.0 - 2.0 ** (1 - k)
    abs_res = 2.0**-k * np.sqrt(n)
    rel_res = abs_res / ((0.5 * z_k + 1.0) * np.sqrt(n))
    residual = abs_res if stop_mode == "abs" else rel_res
    result = solver("fixed_point")(
        lambda z: 0.5 * z + 1.0,
        np.zeros((1, n), dtype),
        max_iter=10,
        tol=residual * factor,
        stop_mode=stop_mode,
    )
    assert int(result.steps) == 10
    np.testing.assert_allclose(np.asarray(result.abs_residual), [abs_res], rtol=rtol)
    np.testing.assert_allclose(np.asarray(result.rel_residual), [rel_res], rtol=rtol)
    assert bool(np.asarray(result.converged)[0]) is expected
