"""GMRES under `solver_batch_dims` > 1 (`common.per_entry(..., joint=True)`): one Krylov
process per sample, a residual and a tolerance test per entry (position), against
`numpy.linalg.solve` on maps that couple the positions as the adjoint of attention does.

The map is `f(z) = z A + c` on `(batch, LENGTH, WIDTH)` states, `A` acting on the
flattened `(LENGTH * WIDTH)` sample (row vectors): "causal" (position t reads the
positions s <= t, as causal attention does; its adjoint reads the later ones), "full"
(every position reads every other), "none" (each position alone).
"""

import numpy as np
import pytest
from keras import ops

from keras_deq import solvers
from keras_deq.solvers import common

from .helpers import FLOAT_DTYPES, LinearMap, compiled, matrix_with_spectral_radius, rng

BATCH, LENGTH, WIDTH = 2, 6, 4
N = LENGTH * WIDTH
TOL = {"float64": 1e-12, "float32": 1e-6}
ERROR = {"float64": 1e-9, "float32": 1e-4}
MASKS = {
    "causal": np.triu(np.ones((LENGTH, LENGTH))),
    "full": np.ones((LENGTH, LENGTH)),
    "none": np.eye(LENGTH),
}


def sequence_map(coupling, norm=0.9, seed=0, scales=None, first_radius=None):
    """`(f, linear)`: the map on `(batch, LENGTH, WIDTH)` states and its `LinearMap` on
    the flattened samples. `scales` `(LENGTH,)` multiplies each position of `c`;
    `first_radius` replaces position 0's own block by one of that spectral radius."""
    a = rng(seed).standard_normal((N, N)) * np.kron(MASKS[coupling], np.ones((WIDTH, WIDTH)))
    a *= norm / np.linalg.norm(a, 2)
    if first_radius is not None:
        a[:WIDTH, :WIDTH] = matrix_with_spectral_radius(WIDTH, first_radius, seed + 2)
    c = rng(seed + 1).standard_normal((BATCH, LENGTH, WIDTH))
    if scales is not None:
        c *= np.asarray(scales)[None, :, None]
    linear = LinearMap(a, c.reshape(BATCH, N))

    def f(z):
        return ops.reshape(linear(ops.reshape(z, (-1, N))), (-1, LENGTH, WIDTH))

    return f, linear


def per_position(solver, joint=True):
    return common.per_entry(lambda f, z0, **m: solver(f, z0, **m), 2, joint=joint)


def position_residuals(linear, state):
    """Per-position `(abs, rel)` residuals of `state`, in float64 numpy."""
    z = np.asarray(state, np.float64).reshape(BATCH, N)
    fz = linear.np(z).reshape(-1, WIDTH)
    r = fz - z.reshape(-1, WIDTH)
    abs_res = np.linalg.norm(r, axis=1)
    return abs_res, abs_res / np.linalg.norm(fz, axis=1)


def assert_solved(result, linear, tol, dtype):
    assert tuple(result.state.shape) == (BATCH, LENGTH, WIDTH)
    for name in ("abs_residual", "rel_residual", "converged", "nonfinite"):
        assert tuple(getattr(result, name).shape) == (BATCH * LENGTH,), name
    assert np.all(np.asarray(result.converged))
    want = linear.reference()
    got = np.asarray(result.state, np.float64).reshape(BATCH, N)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < ERROR[dtype]
    # The returned state of a sample is one measured iterate: the residuals are its own.
    abs_res, rel_res = position_residuals(linear, result.state)
    scale = tol * np.max(abs_res / np.maximum(rel_res, 1e-300))  # tol * the largest ||f(z)||
    np.testing.assert_allclose(
        np.asarray(result.abs_residual), abs_res, rtol=1e-3, atol=0.1 * scale
    )
    assert np.all(rel_res <= 1.01 * tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("coupling", ["causal", "full", "none"])
def test_one_process_per_sample_solves_coupled_positions(coupling, dtype):
    tol = TOL[dtype]
    f, linear = sequence_map(coupling)
    z0 = np.zeros((BATCH, LENGTH, WIDTH), dtype)
    result = per_position(solvers.GMRES(max_iter=300, tol=tol))(f, z0)
    assert_solved(result, linear, tol, dtype)
    # About the evaluations of one process per sample with one tolerance test.
    whole = solvers.GMRES(max_iter=300, tol=tol)(linear, np.zeros((BATCH, N), dtype))
    assert int(result.steps) <= int(whole.steps) + 4


def test_processes_per_position_read_each_others_probes():
    # Why `joint`: a process per position (the fixed-point solvers' `per_entry`) sees
    # the other positions' Krylov probes in its differences of f. On the causal
    # coupling it converges from the last position back, in many more evaluations; on
    # the full coupling not at all.
    z0 = np.zeros((BATCH, LENGTH, WIDTH), "float32")
    solver = solvers.GMRES(max_iter=120, tol=1e-6)
    f, _ = sequence_map("causal")
    joint, separate = per_position(solver)(f, z0), per_position(solver, joint=False)(f, z0)
    assert np.all(np.asarray(separate.converged))
    assert int(separate.steps) > 2 * int(joint.steps)
    f, _ = sequence_map("full")
    assert not np.all(np.asarray(per_position(solver, joint=False)(f, z0).converged))


def test_the_tolerance_is_tested_per_position():
    # Position 0 reads itself only, through a harder block (spectral radius 1.5), and
    # its right-hand side is 1e-3 of the others': the whole sample's relative residual
    # meets tol long before that position's does.
    tol = 1e-5
    f, linear = sequence_map("causal", norm=0.5, scales=[1e-3, 1, 1, 1, 1, 1], first_radius=1.5)
    z0 = np.zeros((BATCH, LENGTH, WIDTH), "float32")
    result = per_position(solvers.GMRES(max_iter=300, tol=tol))(f, z0)
    assert_solved(result, linear, tol, "float32")
    whole = solvers.GMRES(max_iter=300, tol=tol)(linear, np.zeros((BATCH, N), "float32"))
    _, rel_res = position_residuals(linear, ops.reshape(whole.state, (BATCH, LENGTH, WIDTH)))
    assert np.max(rel_res) > 100 * tol
    assert int(result.steps) > int(whole.steps)


def test_compiled_with_xla_matches_eager():
    f, linear = sequence_map("causal", norm=1.5)
    z0 = ops.zeros((BATCH, LENGTH, WIDTH), "float32")
    solve = per_position(solvers.GMRES(max_iter=300, tol=1e-6, restart=8))
    eager = solve(f, z0)
    got = compiled(lambda z: solve(f, z), xla=True)(z0)
    for result in (eager, got):
        assert_solved(result, linear, 1e-6, "float32")
    assert abs(int(got.steps) - int(eager.steps)) <= 1


def test_a_non_finite_position_freezes_its_sample():
    # Sample 1's position 3 blows up at the first Krylov probe (of the norm of f(0)): the
    # sample keeps z0, measured, and only that position is marked non-finite.
    f, linear = sequence_map("causal", norm=0.5)
    limit = 0.5 * np.linalg.norm(linear.c[1])

    def blowing_up(z):
        out = f(z)
        norms = ops.sqrt(ops.sum(ops.reshape(z * z, (BATCH, -1)), axis=1))
        bad = (np.arange(BATCH) == 1)[:, None, None] & (np.arange(LENGTH) == 3)[None, :, None]
        return ops.where(ops.logical_and(bad, (norms > limit)[:, None, None]), np.nan, out)

    z0 = np.zeros((BATCH, LENGTH, WIDTH), "float32")
    result = per_position(solvers.GMRES(max_iter=100, tol=1e-6))(blowing_up, z0)
    nonfinite = np.asarray(result.nonfinite).reshape(BATCH, LENGTH)
    assert nonfinite.tolist() == [[False] * LENGTH, [False, False, False, True, False, False]]
    converged = np.asarray(result.converged).reshape(BATCH, LENGTH)
    assert np.all(converged[0]) and not np.any(converged[1])
    state = np.asarray(result.state)
    np.testing.assert_array_equal(state[1], 0.0)
    want = linear.reference()[0]
    assert np.max(np.abs(state[0].reshape(-1) - want)) < 1e-4 * np.max(np.abs(want))


def test_only_a_joint_solver_takes_an_entry_size():
    f, _ = sequence_map("none")
    z0 = np.zeros((BATCH, LENGTH, WIDTH), "float32")
    with pytest.raises(ValueError, match=r"entry_size.*Anderson.*Received: entry_size=4"):
        solvers.Anderson()(f, z0, entry_size=WIDTH)
    assert solvers.GMRES.joint_entries and not solvers.Anderson.joint_entries
