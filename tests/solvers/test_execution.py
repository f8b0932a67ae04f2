"""Eager, compiled (tf.function, XLA, jax.jit) and MirroredStrategy give the same
answer; dtypes."""

import keras
import numpy as np
import pytest
from keras import ops

from .helpers import (
    FLOAT_DTYPES,
    SOLVER_NAMES,
    TanhMap,
    compiled,
    const,
    dtype_of,
    matrix_with_norm,
    rng,
    solver,
)

N, BATCH = 5, 6
W = matrix_with_norm(N, 0.5, seed=21)
# Tolerance of the solves, per dtype (float32 residuals bottom out near 1e-7).
TOL = {"float64": 1e-10, "float32": 1e-5}


def injected_map(state):
    """f([z, x]) = [tanh(z W + x), x]: each sample carries its own input x, so the
    map does not depend on which rows of the batch a replica holds."""
    z, x = state
    return [ops.tanh(ops.matmul(z, const(W, z)) + x), x]


def initial_state(dtype="float64", batch=BATCH, seed=22):
    x = rng(seed).standard_normal((batch, N))
    return [ops.zeros((batch, N), dtype), ops.convert_to_tensor(x, dtype)]


def reference(batch=BATCH):
    x = rng(22).standard_normal((batch, N))
    z = np.zeros((batch, N))
    for _ in range(200):
        z = np.tanh(z @ W + x)
    return z


def solve(name, state, dtype_tol=1e-10):
    return solver(name)(injected_map, state, max_iter=60, tol=dtype_tol)


def assert_same(a, b, atol=1e-12, res_atol=1e-13, step_slack=0):
    # step_slack: a compiler may reorder float operations, which can move the step at
    # which a residual near tol crosses it by one.
    assert abs(int(a.steps) - int(b.steps)) <= step_slack
    for x, y in zip(keras.tree.flatten(a.state), keras.tree.flatten(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)
    np.testing.assert_allclose(
        np.asarray(a.abs_residual), np.asarray(b.abs_residual), rtol=1e-3, atol=res_atol
    )
    np.testing.assert_array_equal(np.asarray(a.converged), np.asarray(b.converged))


@pytest.fixture(scope="module")
def strategy():
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_xla_matches_eager(dtype):
    # One XLA compilation for all three solvers keeps the suite fast. The results may
    # differ by a step (see assert_same): states by up to 10 tol, residuals by 5 tol.
    tol = TOL[dtype]
    state = initial_state(dtype)
    run = compiled(lambda s: [solve(name, s, tol) for name in SOLVER_NAMES], xla=True)
    for name, xla in zip(SOLVER_NAMES, run(state), strict=True):
        eager = solve(name, state, tol)
        assert np.all(np.asarray(eager.converged)), name
        np.testing.assert_allclose(np.asarray(eager.state[0]), reference(), atol=10 * tol)
        assert_same(eager, xla, atol=10 * tol, res_atol=5 * tol, step_slack=1)


@pytest.mark.tensorflow_only("a graph that runs op by op is TensorFlow's")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_graph_matches_xla(dtype):
    # In a graph outside XLA, Anderson takes its inner products one difference at a
    # time and compiles only its small systems apart; inside XLA, batched products.
    tol = TOL[dtype]
    state = initial_state(dtype)

    def all_solvers(s):
        return [solve(name, s, tol) for name in SOLVER_NAMES]

    graph = compiled(all_solvers)(state)
    xla = compiled(all_solvers, xla=True)(state)
    for name, a, b in zip(SOLVER_NAMES, graph, xla, strict=True):
        assert np.all(np.asarray(a.converged)), name
        assert_same(a, b, atol=10 * tol, res_atol=5 * tol, step_slack=1)


@pytest.mark.tensorflow_only("tf.distribute.MirroredStrategy")
@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_mirrored_strategy_replicas(name, strategy):
    import tensorflow as tf

    assert strategy.num_replicas_in_sync == 2
    state = initial_state()
    half = BATCH // 2

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return [t[i * half : (i + 1) * half] for t in state]

    distributed = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def run(s):
        return strategy.run(lambda part: solve(name, part), args=(s,))

    per_replica = strategy.experimental_local_results(run(distributed))
    assert len(per_replica) == 2
    ref = reference()
    for i, result in enumerate(per_replica):
        eager = solve(name, [t[i * half : (i + 1) * half] for t in state])
        assert_same(eager, result)
        assert np.all(np.asarray(result.converged))
        np.testing.assert_allclose(
            np.asarray(result.state[0]), ref[i * half : (i + 1) * half], atol=1e-9
        )


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float32(name):
    state = initial_state("float32")
    result = solve(name, state, dtype_tol=1e-5)
    assert dtype_of(result.state[0]) == "float32"
    assert dtype_of(result.abs_residual) == "float32"
    assert dtype_of(result.rel_residual) == "float32"
    assert np.all(np.asarray(result.converged))
    assert np.all(np.asarray(result.rel_residual) <= 1e-5)
    np.testing.assert_allclose(np.asarray(result.state[0]), reference(), atol=1e-4)


@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float64_residuals_stay_float64(name):
    result = solve(name, initial_state("float64"))
    assert dtype_of(result.abs_residual) == "float64"
    assert dtype_of(result.rel_residual) == "float64"


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_state_float32_residuals(name, dtype):
    f = TanhMap(N, BATCH, norm=0.5, seed=3)
    result = solver(name)(f, ops.zeros((BATCH, N), dtype), max_iter=30, tol=2e-2)
    assert dtype_of(result.state) == dtype
    assert dtype_of(result.abs_residual) == "float32"
    assert dtype_of(result.rel_residual) == "float32"
    assert np.all(np.asarray(result.converged))
    state = np.asarray(ops.convert_to_numpy(result.state), np.float64)
    assert np.all(np.isfinite(state))
    np.testing.assert_allclose(state, f.reference(), atol=0.1)
    # The solver iterates in float32; the residuals are those of its float32 iterate,
    # which the returned half-precision state rounds (by at most eps/2 per entry, and
    # f is a contraction, so the residual moves by at most ~eps * ||z||).
    fz = np.asarray(ops.convert_to_numpy(f(result.state)), np.float64)
    abs_res = np.linalg.norm(fz - state, axis=1)
    eps = float(np.finfo(np.float16).eps) if dtype == "float16" else 2.0**-7
    bound = 2 * eps * np.linalg.norm(state, axis=1)
    assert np.all(np.abs(np.asarray(result.abs_residual) - abs_res) <= bound)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_compiled_matches_eager_without_retracing(name, dtype):
    traces = []

    def traced(s):
        traces.append(1)  # runs once per trace, not per call
        return solve(name, s, TOL[dtype])

    run = compiled(traced)
    x1, x2 = initial_state(dtype), initial_state(dtype, seed=5)
    a, b = run(x1), run(x2)
    # One trace serves different values of the same shape (no Python-side state).
    assert len(traces) == 1
    # float64: tf.function runs the eager kernels, so the results agree to rounding.
    # float32 (also under jax.jit, which compiles the whole solve as one XLA program):
    # a step apart at most, as in test_xla_matches_eager.
    if dtype == "float64":
        tolerances = {}
    else:
        tolerances = dict(atol=10 * TOL[dtype], res_atol=5 * TOL[dtype], step_slack=1)
    assert_same(solve(name, x1, TOL[dtype]), a, **tolerances)
    assert_same(solve(name, x2, TOL[dtype]), b, **tolerances)
    assert not np.allclose(np.asarray(a.state[0]), np.asarray(b.state[0]))
