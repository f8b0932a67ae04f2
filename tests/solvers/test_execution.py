"""Eager, tf.function, XLA and MirroredStrategy give the same answer; dtypes."""

import numpy as np
import pytest
import tensorflow as tf

from .helpers import SOLVER_NAMES, TanhMap, matrix_with_norm, rng, solver

N, BATCH = 5, 6
W = matrix_with_norm(N, 0.5, seed=21)


def injected_map(state):
    """f([z, x]) = [tanh(z W + x), x]: each sample carries its own input x, so the
    map does not depend on which rows of the batch a replica holds."""
    z, x = state
    return [tf.tanh(tf.matmul(z, tf.constant(W, z.dtype)) + x), x]


def initial_state(dtype=tf.float64, batch=BATCH):
    x = rng(22).standard_normal((batch, N))
    return [tf.zeros([batch, N], dtype), tf.constant(x, dtype)]


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
    for x, y in zip(tf.nest.flatten(a.state), tf.nest.flatten(b.state), strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(
        a.abs_residual.numpy(), b.abs_residual.numpy(), rtol=1e-3, atol=res_atol
    )
    np.testing.assert_array_equal(a.converged.numpy(), b.converged.numpy())


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_xla_matches_eager():
    # One XLA compilation for all three solvers keeps the suite fast.
    state = initial_state()

    @tf.function(jit_compile=True)
    def run(s):
        return [solve(name, s) for name in SOLVER_NAMES]

    for name, xla in zip(SOLVER_NAMES, run(state), strict=True):
        eager = solve(name, state)
        assert bool(tf.reduce_all(eager.converged)), name
        np.testing.assert_allclose(eager.state[0].numpy(), reference(), atol=1e-9)
        assert_same(eager, xla, atol=1e-9, res_atol=5e-10, step_slack=1)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_mirrored_strategy_replicas(name, strategy):
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
        assert bool(tf.reduce_all(result.converged))
        np.testing.assert_allclose(
            result.state[0].numpy(), ref[i * half : (i + 1) * half], atol=1e-9
        )


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float32(name):
    state = initial_state(tf.float32)
    result = solve(name, state, dtype_tol=1e-5)
    assert result.state[0].dtype == tf.float32
    assert result.abs_residual.dtype == tf.float32
    assert result.rel_residual.dtype == tf.float32
    assert bool(tf.reduce_all(result.converged))
    assert np.all(result.rel_residual.numpy() <= 1e-5)
    np.testing.assert_allclose(result.state[0].numpy(), reference(), atol=1e-4)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float64_residuals_stay_float64(name):
    result = solve(name, initial_state(tf.float64))
    assert result.abs_residual.dtype == tf.float64
    assert result.rel_residual.dtype == tf.float64


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_state_float32_residuals(name, dtype):
    f = TanhMap(N, BATCH, norm=0.5, seed=3)
    result = solver(name)(f, tf.zeros([BATCH, N], dtype), max_iter=30, tol=2e-2)
    assert result.state.dtype == dtype
    assert result.abs_residual.dtype == tf.float32
    assert result.rel_residual.dtype == tf.float32
    assert bool(tf.reduce_all(result.converged))
    state = tf.cast(result.state, tf.float64).numpy()
    assert np.all(np.isfinite(state))
    np.testing.assert_allclose(state, f.reference(), atol=0.1)
    # The solver iterates in float32; the residuals are those of its float32 iterate,
    # which the returned half-precision state rounds (by at most eps/2 per entry, and
    # f is a contraction, so the residual moves by at most ~eps * ||z||).
    fz = tf.cast(f(result.state), tf.float64).numpy()
    abs_res = np.linalg.norm(fz - state, axis=1)
    eps = float(np.finfo(np.float16).eps) if dtype == tf.float16 else 2.0**-7
    bound = 2 * eps * np.linalg.norm(state, axis=1)
    assert np.all(np.abs(result.abs_residual.numpy() - abs_res) <= bound)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_graph_matches_eager_without_retracing(name):
    run = tf.function(lambda s: solve(name, s))
    x1 = initial_state()
    x2 = [tf.zeros([BATCH, N], tf.float64), tf.constant(rng(5).standard_normal((BATCH, N)))]
    a, b = run(x1), run(x2)
    # One trace serves different values of the same shape (no Python-side state).
    assert run.experimental_get_tracing_count() == 1
    assert_same(solve(name, x1), a)
    assert_same(solve(name, x2), b)
    assert not np.allclose(a.state[0].numpy(), b.state[0].numpy())
