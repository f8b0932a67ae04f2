"""`SolverTrace`: the residuals the solver loop records per iteration, against the residuals of
hand-written numpy iterations of the same solvers (`helpers.picard_np`, `anderson_np`,
`broyden_np`)."""

import numpy as np
import pytest
from keras import ops

from keras_deq import solvers

from .helpers import (
    FLOAT_DTYPES,
    TanhMap,
    anderson_np,
    broyden_np,
    compiled,
    numpy,
    picard_np,
    residuals_np,
)

BATCH, WIDTH, ITERS = 4, 6, 9


def _expected(iterates, f_np):
    """(iterations, batch) abs and rel residuals of the numpy iterates `z_0 .. z_{K-1}`."""
    pairs = [residuals_np(f_np(z), z) for z in iterates]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


REFERENCES = {
    "fixed_point": (
        lambda: solvers.FixedPoint(max_iter=ITERS, tol=1e-300),
        lambda f, z0: picard_np(f, z0, ITERS - 1),
    ),
    "anderson": (
        lambda: solvers.Anderson(max_iter=ITERS, tol=1e-300, window=3, beta=0.8, ridge=1e-4),
        lambda f, z0: anderson_np(f, z0, ITERS - 1, window=3, beta=0.8, ridge=1e-4),
    ),
    "broyden": (
        lambda: solvers.Broyden(max_iter=ITERS, tol=1e-300, memory=4),
        lambda f, z0: broyden_np(f, z0, ITERS - 1, memory=4),
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_trace_matches_numpy_iterations(name, dtype):
    g = TanhMap(WIDTH, BATCH, norm=0.9, seed=3, dtype=dtype)
    make, reference = REFERENCES[name]
    z0 = np.zeros((BATCH, WIDTH), dtype)
    result = make()(g, z0, trace=True)
    want_abs, want_rel = _expected(reference(g.np, z0.astype("float64")), g.np)
    trace = numpy(result.trace)
    assert int(trace.steps) == int(result.steps) == ITERS
    assert trace.abs_residual.shape == (ITERS, BATCH)
    # float32: the iterates drift from float64's by round-off, relative to the first residual.
    tight = {"rtol": 1e-8, "atol": 1e-14} if dtype == "float64" else {"rtol": 1e-3, "atol": 1e-5}
    np.testing.assert_allclose(trace.abs_residual, want_abs, **tight)
    np.testing.assert_allclose(trace.rel_residual, want_rel, **tight)
    mean = numpy(result.trace.batch_mean())
    np.testing.assert_allclose(mean.abs_residual, want_abs.mean(axis=1), **tight)
    np.testing.assert_allclose(mean.rel_residual, want_rel.mean(axis=1), **tight)
    # The returned residuals are the best ones the trace saw.
    np.testing.assert_array_equal(numpy(result.abs_residual), trace.abs_residual.min(axis=0))


def test_rows_after_the_stop_are_nan_and_the_state_is_unchanged():
    g = TanhMap(WIDTH, BATCH, norm=0.5, seed=1, dtype=np.float32)
    z0 = np.zeros((BATCH, WIDTH), "float32")
    solver = solvers.FixedPoint(max_iter=40, tol=1e-4)
    plain, traced = solver(g, z0), solver(g, z0, trace=True)
    assert plain.trace is None
    steps = int(traced.steps)
    assert 2 < steps < 40
    rel = numpy(traced.trace.rel_residual)
    assert np.isfinite(rel[:steps]).all() and np.isnan(rel[steps:]).all()
    # The stopping test read the last row: the worst sample met tol there, not before.
    assert rel[steps - 1].max() <= 1e-4 < rel[steps - 2].max()
    np.testing.assert_array_equal(numpy(traced.state), numpy(plain.state))
    assert int(plain.steps) == steps


def test_trace_in_a_compiled_function_and_of_a_structured_state():
    g = TanhMap(WIDTH, BATCH, norm=0.7, seed=2, dtype=np.float32)

    def f(z):  # the state as two tensors: the solver packs them into one vector
        out = g(ops.concatenate([z["a"], z["b"]], axis=1))
        return {"a": out[:, :2], "b": out[:, 2:]}

    z0 = {"a": np.zeros((BATCH, 2), "float32"), "b": np.zeros((BATCH, 4), "float32")}
    solver = solvers.FixedPoint(max_iter=ITERS, tol=1e-30)
    eager = numpy(solver(f, z0, trace=True).trace)
    want_abs, _ = _expected(picard_np(g.np, np.zeros((BATCH, WIDTH)), ITERS - 1), g.np)
    np.testing.assert_allclose(eager.abs_residual, want_abs, rtol=1e-4, atol=1e-6)
    run = compiled(lambda z: solver(f, z, trace=True).trace.abs_residual)
    np.testing.assert_allclose(numpy(run(z0)), eager.abs_residual, rtol=1e-5, atol=1e-7)


def test_trace_is_refused_where_it_cannot_be_recorded():
    g = TanhMap(WIDTH, BATCH, dtype=np.float32)
    z0 = np.zeros((BATCH, WIDTH), "float32")
    with pytest.raises(ValueError, match="`trace` must be a boolean"):
        solvers.Anderson()(g, z0, trace=1)
    with pytest.raises(ValueError, match="int `max_iter`"):
        solvers.FixedPoint(max_iter=ops.convert_to_tensor(3, "int32"))(g, z0, trace=True)
    with pytest.raises(ValueError, match="shared loop"):
        solvers.GMRES()(g, z0, trace=True)
