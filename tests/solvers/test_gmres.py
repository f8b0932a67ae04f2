"""GMRES on affine maps: against `numpy.linalg.solve` and a plain numpy GMRES(m).

The map is `f(z) = z A + c` (row vectors, `helpers.LinearMap`), whose fixed point
solves `z (I - A) = c`. The numpy reference of a restart cycle builds its Krylov
basis by modified Gram-Schmidt and solves its small least-squares problem with
`numpy.linalg.lstsq`, so it shares no code (and no algorithm for the small
problem: no Givens rotations) with the solver.
"""

import json
import re

import keras
import numpy as np
import pytest
from keras import ops

import keras_deq
from keras_deq import solvers
from keras_deq.solvers import base

from .helpers import (
    BACKEND,
    FLOAT_DTYPES,
    LinearMap,
    Recorder,
    compiled,
    const,
    flat,
    matrix_with_norm,
    matrix_with_spectral_radius,
    rng,
    true_residuals,
)

N, BATCH = 8, 3
# A tolerance each dtype reaches, and the error allowed on the solution (relative to
# its largest entry: the systems below have condition numbers up to about 30).
TOL = {"float64": 1e-12, "float32": 1e-6}
ERROR = {"float64": 1e-9, "float32": 1e-4}


def linear_map(radius=None, norm=None, seed=0, batch=BATCH, n=N):
    if radius is not None:
        a = matrix_with_spectral_radius(n, radius, seed)
    else:
        a = matrix_with_norm(n, norm, seed)
    return LinearMap(a, rng(seed + 1).standard_normal((batch, n)))


def relative_error(got, want):
    return float(np.max(np.abs(flat(got) - want)) / np.max(np.abs(want)))


def gmres_cycle_np(f_np, x, m):
    """One cycle of GMRES(m) for `u = f(u)` (affine `f`) from `x`, per sample, in float64:
    `(I - A) u = b` with `b = f(0)` and `A v = f(v) - f(0)`. Returns the cycle's iterate."""
    b = f_np(np.zeros_like(x))
    out = np.empty_like(x)
    for s in range(x.shape[0]):

        def apply(v, s=s):  # (I - A) v for sample s (the map acts on whole batches)
            rows = np.zeros_like(x)
            rows[s] = v
            return (rows - (f_np(rows) - b))[s]

        r = b[s] - apply(x[s])
        beta = np.linalg.norm(r)
        basis, h = [r / beta], np.zeros((m + 1, m))
        for j in range(m):
            w = apply(basis[j])
            for i, v in enumerate(basis):  # modified Gram-Schmidt
                h[i, j] = v @ w
                w = w - h[i, j] * v
            h[j + 1, j] = np.linalg.norm(w)
            basis.append(w / h[j + 1, j])
        e1 = np.zeros(m + 1)
        e1[0] = beta
        y = np.linalg.lstsq(h, e1, rcond=None)[0]
        out[s] = x[s] + np.array(basis[:-1]).T @ y
    return out


# ------------------------------------------------------------ against numpy.linalg.solve
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("radius", [0.5, 1.5])
def test_solves_a_nonsymmetric_system_like_numpy(radius, dtype):
    f = linear_map(radius=radius, seed=3)
    z0 = np.zeros((BATCH, N), dtype)
    result = solvers.GMRES(max_iter=60, tol=TOL[dtype])(f, z0)
    assert np.all(np.asarray(result.converged))
    assert relative_error(result.state, f.reference()) < ERROR[dtype]
    # One measurement, at most N Krylov vectors (the dimension), one measurement.
    assert int(result.steps) <= N + 2
    # The reported residuals are those of the returned state.
    abs_res, rel_res = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-3, atol=1e-12)
    assert np.all(rel_res <= 2 * TOL[dtype])
    if radius > 1:
        # Where fixed-point iteration (and an implicit adjoint solved by it) diverges:
        # GMRES needs only I - A invertible.
        picard = solvers.FixedPoint(max_iter=60, tol=TOL[dtype])(f, z0)
        assert not np.any(np.asarray(picard.converged))
        assert relative_error(picard.state, f.reference()) > 0.1


@pytest.mark.float64
@pytest.mark.parametrize("restart", [1, 2, 3])
def test_restarted_cycles_match_a_numpy_gmres(restart):
    # ||A||_2 < 1: the symmetric part of I - A is positive definite, so GMRES(m)
    # converges for every m. Each cycle evaluates f at its iterate, then at m Krylov
    # probes; the iterate measured after each cycle is numpy's GMRES(m) iterate.
    f = linear_map(norm=0.9, seed=5)
    cycles = 4
    recorder = Recorder(f)
    z0 = rng(6).standard_normal((BATCH, N))
    result = solvers.GMRES(max_iter=cycles * (restart + 1) + 1, tol=1e-30, restart=restart)(
        recorder, z0
    )
    assert int(result.steps) == cycles * (restart + 1) + 1
    measured = recorder.inputs[:: restart + 1]
    x = z0
    for cycle, got in enumerate(measured):
        np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12, err_msg=f"cycle {cycle}")
        x = gmres_cycle_np(f.np, x, restart)
    # The returned state is the best measured iterate: the last one here (GMRES's
    # residual never grows), with its residual.
    np.testing.assert_allclose(flat(result.state), measured[-1], rtol=0, atol=0)
    abs_res, _ = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-9)
    # ... and the solves converge towards numpy's solution.
    long = solvers.GMRES(max_iter=400, tol=1e-12, restart=restart)(f, z0)
    assert np.all(np.asarray(long.converged))
    assert relative_error(long.state, f.reference()) < 1e-9


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_stops_on_the_measured_residual_of_its_mode(stop_mode, dtype):
    f = linear_map(norm=0.8, seed=7)
    tol = {"float64": 1e-8, "float32": 1e-4}[dtype]
    result = solvers.GMRES(tol=tol, stop_mode=stop_mode)(f, np.zeros((BATCH, N), dtype))
    abs_res, rel_res = true_residuals(f, result.state)
    measured = rel_res if stop_mode == "rel" else abs_res
    assert np.all(np.asarray(result.converged))
    assert np.all(measured <= 1.01 * tol)


def test_max_iter_ends_on_a_measurement():
    # With 5 evaluations, the last one measures the Krylov iterate of 3 vectors: the
    # result is that iterate, not the start, and its residual is the true one.
    f = linear_map(radius=0.9, seed=8)
    recorder = Recorder(f)
    result = solvers.GMRES(max_iter=5, tol=1e-12)(recorder, np.zeros((BATCH, N), "float32"))
    assert int(result.steps) == 5 and recorder.calls == 5
    np.testing.assert_array_equal(flat(result.state), recorder.inputs[-1])
    start = np.linalg.norm(f.np(np.zeros((BATCH, N))), axis=1)
    assert np.all(np.asarray(result.abs_residual) < start)
    abs_res, _ = true_residuals(f, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-4)


# ------------------------------------------------------------------ samples and states
def _block_map(batch):
    """`z A + c` with A block diagonal (blocks of 2 and N - 2): sample 0's right-hand
    side lies in the first block, so its Krylov space has dimension 2; the others'
    have dimension N."""
    a = np.zeros((N, N))
    a[:2, :2] = matrix_with_spectral_radius(2, 0.7, seed=1)
    a[2:, 2:] = matrix_with_spectral_radius(N - 2, 1.2, seed=2)
    c = rng(9).standard_normal((batch, N))
    c[0, 2:] = 0.0
    return LinearMap(a, c)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_each_sample_is_its_own_system(dtype):
    tol = TOL[dtype]
    both = solvers.GMRES(tol=tol)(_block_map(2), np.zeros((2, N), dtype))
    alone = solvers.GMRES(tol=tol)(_block_map(1), np.zeros((1, N), dtype))
    assert np.all(np.asarray(both.converged)) and np.all(np.asarray(alone.converged))
    assert int(alone.steps) == 4  # a measurement, 2 Krylov vectors, a measurement
    assert int(both.steps) > int(alone.steps)  # the other sample kept the loop running
    # Sample 0 returns its own first converged iterate, not a later one.
    atol = {"float64": 1e-13, "float32": 1e-6}[dtype]
    np.testing.assert_allclose(flat(both.state)[:1], flat(alone.state), rtol=0, atol=atol)
    assert relative_error(both.state, _block_map(2).reference()) < ERROR[dtype]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nested_states(dtype):
    # A dict of an image-shaped and a vector-shaped tensor: the affine map acts on the
    # packed state; the answer is numpy's on the flattened system.
    f = linear_map(radius=1.3, seed=10, n=11)

    def nested(z):
        matrix = ops.concatenate([ops.reshape(z["image"], (-1, 6)), z["vector"]], axis=1)
        out = f(matrix)
        return {"image": ops.reshape(out[:, :6], (-1, 2, 3)), "vector": out[:, 6:]}

    z0 = {"image": np.zeros((BATCH, 2, 3), dtype), "vector": np.zeros((BATCH, 5), dtype)}
    result = solvers.GMRES(tol=TOL[dtype])(nested, z0)
    assert set(result.state) == {"image", "vector"}
    assert tuple(result.state["image"].shape) == (BATCH, 2, 3)
    want = f.reference()
    got = np.concatenate([flat(result.state["image"]), flat(result.state["vector"])], axis=1)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < ERROR[dtype]


def test_compiled_matches_eager():
    # XLA (jax.jit on JAX) with a run-time budget (a tensor `max_iter`, which changes
    # without retracing), and on TensorFlow a graph that runs op by op.
    f = linear_map(norm=0.95, seed=11)  # restarted every 5 vectors: a few cycles
    z0 = ops.zeros((BATCH, N), "float32")
    eager = solvers.GMRES(tol=1e-6, restart=5)(f, z0)
    assert np.all(np.asarray(eager.converged)) and int(eager.steps) > 12

    def solve(z, budget):
        return solvers.GMRES(max_iter=budget, tol=1e-6, restart=5)(f, z)

    xla = compiled(solve, xla=True)
    runs = {"xla": xla(z0, ops.convert_to_tensor(60, "int32"))}
    short = xla(z0, ops.convert_to_tensor(4, "int32"))
    assert int(short.steps) == 4 and not np.any(np.asarray(short.converged))
    if BACKEND == "tensorflow":
        runs["graph"] = compiled(solve)(z0, ops.convert_to_tensor(60, "int32"))
    for name, got in runs.items():
        assert np.all(np.asarray(got.converged)), name
        assert abs(int(got.steps) - int(eager.steps)) <= 1, name
        assert relative_error(got.state, f.reference()) < 1e-4, name


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_sample_is_frozen_at_its_best_iterate(bad_value):
    # Sample 1's map blows up at its first Krylov probe (whose norm is at least
    # ||f(0)||), after f(0) was measured: it keeps z0 with that residual; the other
    # samples converge as if alone.
    f = linear_map(radius=0.9, seed=12)
    limit = 0.5 * np.linalg.norm(f.c[1])

    def blowing_up(z):
        norms = ops.sqrt(ops.sum(z * z, axis=1, keepdims=True))
        blown = ops.logical_and(np.arange(BATCH)[:, None] == 1, norms > limit)
        return ops.where(blown, const(bad_value, z), f(z))

    result = solvers.GMRES(tol=1e-6)(blowing_up, np.zeros((BATCH, N), "float32"))
    state = flat(result.state)
    assert np.all(np.isfinite(state))
    assert np.asarray(result.nonfinite).tolist() == [False, True, False]
    assert np.asarray(result.converged).tolist() == [True, False, True]
    np.testing.assert_array_equal(state[1], 0.0)
    np.testing.assert_allclose(np.asarray(result.abs_residual)[1], np.linalg.norm(f.c[1]), 1e-6)
    want = f.reference()
    assert np.max(np.abs(state[[0, 2]] - want[[0, 2]])) < 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_slightly_non_affine_map_restarts_from_measured_iterates(dtype):
    # Off an affine map, the Krylov estimate of the residual is wrong: a sample that
    # left its cycle on the estimate is measured, misses `tol`, and waits for the next
    # cycle, which starts from the measured iterate. The residuals stay the true ones.
    f = linear_map(norm=0.5, seed=13)

    def bent(z):
        return f(z) + 1e-3 * ops.tanh(z)

    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    result = solvers.GMRES(max_iter=200, tol=tol)(bent, np.zeros((BATCH, N), dtype))
    assert np.all(np.asarray(result.converged))
    assert int(result.steps) > N + 2  # more than one cycle
    abs_res, rel_res = true_residuals(bent, result.state)
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=1e-3)
    assert np.all(rel_res <= 1.01 * tol)


def test_a_zero_right_hand_side_is_solved_at_once():
    result = solvers.GMRES()(lambda z: 0.5 * z, np.zeros((2, 4), "float32"))
    assert int(result.steps) == 1 and np.all(np.asarray(result.converged))
    assert np.all(np.asarray(result.state) == 0.0)


# ------------------------------------------------------------ settings and serialization
def test_config_round_trips():
    solver = solvers.GMRES(max_iter=9, tol=1e-6, stop_mode="abs", restart=4)
    config = solver.get_config()
    assert config == {"max_iter": 9, "tol": 1e-6, "stop_mode": "abs", "restart": 4}
    assert keras.saving.get_registered_name(solvers.GMRES) == "keras_deq>GMRES"
    text = json.dumps(solvers.serialize(solver))
    for restored in (
        solvers.deserialize(json.loads(text)),
        keras.saving.deserialize_keras_object(json.loads(text)),
        solvers.get(json.loads(text)),
    ):
        assert type(restored) is solvers.GMRES and restored.get_config() == config
    assert repr(solvers.get("gmres", restart=4)) == (
        "GMRES(max_iter=50, tol=0.0001, stop_mode='rel', restart=4)"
    )
    assert solvers.get(solver, restart=7).restart == 7


@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"restart": 0}, "restart=0"),
        ({"restart": 2.5}, "restart=2.5"),
        ({"restart": True}, "restart=True"),
        ({"max_iter": 0}, "max_iter=0"),
        ({"tol": -1e-3}, "tol=-0.001"),
        ({"tol": float("nan")}, "tol=nan"),
        ({"stop_mode": "REL"}, "stop_mode='REL'"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, received):
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        solvers.GMRES(**kwargs)
    with pytest.raises(ValueError, match=re.escape(received)):
        solvers.get("gmres", **kwargs)


def test_its_iterations_are_not_differentiated():
    with base.differentiable_loops():
        with pytest.raises(ValueError, match="adjoint solver"):
            solvers.GMRES()(lambda z: 0.5 * z + 1.0, np.zeros((2, 3), "float32"))


def test_deq_refuses_gmres_as_its_forward_solver():
    cell = keras_deq.DenseCell(4)
    for solver in ("gmres", solvers.GMRES(restart=3), solvers.serialize(solvers.GMRES())):
        with pytest.raises(ValueError, match=r"`solver`.*affine.*backward_solver='gmres'"):
            keras_deq.DEQ(cell, solver=solver)


def test_deq_takes_gmres_as_its_adjoint_solver():
    cell = keras_deq.DenseCell(4)
    flat_args = keras_deq.DEQ(
        cell,
        solver="anderson",
        max_iter=30,
        tol=1e-5,
        stop_mode="abs",
        backward_solver="gmres",
        backward_solver_options={"restart": 6},
    )
    assert flat_args._adjoint.get_config() == {
        "max_iter": 30,
        "tol": 1e-5,
        "stop_mode": "abs",
        "restart": 6,
    }
    own = keras_deq.DEQ(cell, backward=keras_deq.backward.Implicit(solver="gmres"))
    assert isinstance(own._adjoint, solvers.GMRES)
    clone = keras_deq.DEQ.from_config(json.loads(json.dumps(own.get_config())))
    assert clone._adjoint.get_config() == own._adjoint.get_config()
    with pytest.raises(ValueError, match=r"backward_solver_options\['restart'\]"):
        keras_deq.DEQ(cell, backward_solver="gmres", backward_solver_options={"restart": 0})
