"""`DEQ.solver_trace`: the residuals of the layer's forward solve per iteration, against a
hand-written Python loop of its cell."""

import keras
import numpy as np
from keras import ops

from keras_deq import DEQ, DenseCell
from keras_deq.solvers import Budget

BATCH, UNITS = 3, 5


def _layer(max_iter):
    keras.utils.set_random_seed(0)
    # A slow contraction (gain 0.9): no sample converges within the budgets below.
    cell = DenseCell(UNITS, kernel_initializer=keras.initializers.Orthogonal(0.9, seed=0))
    layer = DEQ(cell, solver="fixed_point", max_iter=max_iter, tol=1e-7, on_failure="ignore")
    x = np.random.default_rng(1).normal(size=(BATCH, UNITS)).astype("float32")
    layer.build(x.shape)
    return layer, x


def _hand_loop(cell, x, iters, z=None):
    """(iters, batch) abs and rel residuals of z_0 .. z_{iters-1}, z_{k+1} = cell(z_k, x),
    measured in float64 numpy; and the iterates."""
    z = np.zeros((BATCH, UNITS), "float32") if z is None else z
    abs_rows, rel_rows, zs = [], [], []
    for _ in range(iters):
        fz = ops.convert_to_numpy(cell(ops.convert_to_tensor(z), ops.convert_to_tensor(x)))
        diff = np.linalg.norm(fz.astype("float64") - z, axis=1)
        abs_rows.append(diff)
        rel_rows.append(diff / np.linalg.norm(fz.astype("float64"), axis=1))
        zs.append(z)
        z = fz
    return np.stack(abs_rows), np.stack(rel_rows), zs


def test_solver_trace_matches_a_hand_written_loop_of_the_cell():
    layer, x = _layer(max_iter=7)
    trace = layer.solver_trace(x)
    want_abs, want_rel, _ = _hand_loop(layer.cell, x, 7)
    assert int(trace.steps) == 7
    tol = {"rtol": 1e-4, "atol": 1e-6}
    np.testing.assert_allclose(ops.convert_to_numpy(trace.abs_residual), want_abs, **tol)
    np.testing.assert_allclose(ops.convert_to_numpy(trace.rel_residual), want_rel, **tol)
    mean = trace.batch_mean()
    np.testing.assert_allclose(ops.convert_to_numpy(mean.rel_residual), want_rel.mean(1), **tol)


def test_solver_trace_follows_the_budget_and_the_initial_state():
    layer, x = _layer(max_iter=Budget(4, eval_max_iter=9, min_iter=2))
    evaluation = layer.solver_trace(x)
    assert tuple(evaluation.rel_residual.shape) == (9, BATCH)
    assert int(evaluation.steps) == 9
    training = layer.solver_trace(x, training=True)  # the largest training budget
    assert tuple(training.rel_residual.shape) == (4, BATCH)
    want_abs, _, zs = _hand_loop(layer.cell, x, 6)
    started = layer.solver_trace(x, initial_state=zs[3])
    np.testing.assert_allclose(
        ops.convert_to_numpy(started.abs_residual)[:3], want_abs[3:6], rtol=1e-4, atol=1e-6
    )
