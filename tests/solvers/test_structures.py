"""States of any structure: vectors, images, sequences, lists of tensors, dicts."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq.solvers import common

from .helpers import (
    FLOAT_DTYPES,
    SOLVER_NAMES,
    assert_result_shapes,
    compiled,
    const,
    dtype_of,
    flat,
    matrix_with_norm,
    rng,
    solver,
)

# Tolerance of the solves, per dtype (float32 residuals bottom out near 1e-7).
TOL = {"float64": 1e-9, "float32": 1e-5}


class FlatTanh:
    """f(z) = tanh(flat(z) W + x), reshaped back to the structure of z: a 0.5-contraction
    that mixes every entry of every tensor of the state."""

    def __init__(self, example):
        self.example = example
        leaves = keras.tree.flatten(example)
        self.batch = leaves[0].shape[0]
        self.sizes = [int(np.prod(t.shape[1:])) for t in leaves]
        n = sum(self.sizes)
        self.w = matrix_with_norm(n, 0.5, seed=n)
        self.x = rng(n + 1).standard_normal((self.batch, n))

    def __call__(self, z):
        leaves = keras.tree.flatten(z)
        matrix = ops.concatenate([ops.reshape(t, (ops.shape(t)[0], -1)) for t in leaves], axis=1)
        out = ops.tanh(ops.matmul(matrix, const(self.w, matrix)) + const(self.x, matrix))
        ends = np.cumsum(self.sizes)
        parts = [out[:, end - size : end] for size, end in zip(self.sizes, ends, strict=True)]
        return keras.tree.pack_sequence_as(
            z, [ops.reshape(p, ops.shape(t)) for p, t in zip(parts, leaves, strict=True)]
        )

    def reference(self):
        z = np.zeros((self.batch, self.w.shape[0]))
        for _ in range(200):
            z = np.tanh(z @ self.w + self.x)
        return z


def _zeros(shapes, container, dtype):
    tensors = [ops.zeros(s, dtype) for s in shapes]
    if container is None:
        return tensors[0]
    if container is dict:
        return {f"scale{i}": t for i, t in enumerate(tensors)}
    return container(tensors)


CASES = {
    "vector": ([(5, 6)], None),
    "rank1": ([(5,)], None),
    "image": ([(3, 4, 4, 2)], None),
    "sequence": ([(4, 5, 3)], None),
    "multiscale_list": ([(3, 4, 4, 2), (3, 2, 2, 3)], list),
    "tuple": ([(3, 4), (3, 2, 3)], tuple),
    "dict": ([(2, 3, 2), (2, 5)], dict),
    "single_list": ([(3, 2, 2)], list),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_structure_in_structure_out(name, case, dtype):
    shapes, container = CASES[case]
    z0 = _zeros(shapes, container, dtype)
    f = FlatTanh(z0)
    result = solver(name)(f, z0, max_iter=100, tol=TOL[dtype])
    keras.tree.assert_same_structure(result.state, z0)
    assert type(result.state) is type(z0)
    for got, want in zip(keras.tree.flatten(result.state), keras.tree.flatten(z0), strict=True):
        assert tuple(got.shape) == tuple(want.shape)
        assert dtype_of(got) == dtype_of(want) == dtype
    assert_result_shapes(result, f.batch)
    assert np.all(np.asarray(result.converged))
    n = f.w.shape[0]
    err = np.linalg.norm(flat(result.state) - f.reference(), axis=1)
    assert np.all(err <= 2 * TOL[dtype] * (np.sqrt(n) + 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batch_sizes(name, batch, dtype):
    z0 = [np.zeros((batch, 3, 2), dtype), np.zeros((batch, 4), dtype)]
    f = FlatTanh(z0)
    result = solver(name)(f, z0, max_iter=100, tol=TOL[dtype])
    assert_result_shapes(result, batch)
    assert [tuple(t.shape) for t in result.state] == [(batch, 3, 2), (batch, 4)]
    assert np.all(np.asarray(result.converged))
    err = np.linalg.norm(flat(result.state) - f.reference(), axis=1)
    assert np.all(err <= 2 * TOL[dtype] * (np.sqrt(10) + 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_multiscale_parts_are_not_mixed_up(name, dtype):
    # Two scales with their own fixed points: a -> 0.5 a + 1 (a* = 2) and
    # b -> 0.5 b - 3 (b* = -6). Swapping or mis-splitting parts would show.
    def f(z):
        a, b = z
        return [0.5 * a + 1.0, 0.5 * b - 3.0]

    # The error is at most 2 tol ||f(z)|| (0.5-contraction, ||f(z)|| ~ 24): 100 tol.
    tol = {"float64": 1e-12, "float32": 1e-6}[dtype]
    z0 = [np.zeros((3, 2, 2, 1), dtype), np.zeros((3, 5), dtype)]
    result = solver(name)(f, z0, max_iter=200, tol=tol)
    np.testing.assert_allclose(np.asarray(result.state[0]), 2.0, atol=100 * tol)
    np.testing.assert_allclose(np.asarray(result.state[1]), -6.0, atol=100 * tol)


@pytest.mark.tensorflow_only("unknown static dimensions exist only in TensorFlow graphs")
@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_unknown_static_shapes_in_graph(name):
    import tensorflow as tf

    spec = [
        tf.TensorSpec([None, None, 3], tf.float64),
        tf.TensorSpec([None, 5], tf.float64),
    ]

    @tf.function(input_signature=[spec])
    def run(z0):
        return solver(name)(lambda s: [0.5 * ops.tanh(s[0]) + 1.0, 0.5 * s[1] - 1.0], z0, tol=1e-10)

    result = run([np.zeros((2, 4, 3)), np.zeros((2, 5))])
    assert [tuple(t.shape) for t in result.state] == [(2, 4, 3), (2, 5)]
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state[1]), -2.0, atol=1e-9)
    # the scalar equation a = 0.5 tanh(a) + 1
    a = 1.0
    for _ in range(200):
        a = 0.5 * np.tanh(a) + 1.0
    np.testing.assert_allclose(np.asarray(result.state[0]), a, atol=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_numpy_initial_state(name, dtype):
    z0 = np.zeros((2, 3), dtype)
    tol = {"float64": 1e-10, "float32": 1e-6}[dtype]
    result = solver(name)(lambda z: 0.5 * z + 1.0, z0, tol=tol)
    assert dtype_of(result.state) == dtype
    np.testing.assert_allclose(np.asarray(result.state), 2.0, atol=10 * tol)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_state_without_entries(name):
    # A (batch, 0) state is its own fixed point: ||f(z) - z|| = ||f(z)|| = 0, relative
    # residual 0, so one evaluation solves it.
    result = solver(name)(lambda z: 0.5 * z + 1.0, ops.zeros((2, 0)))
    assert tuple(result.state.shape) == (2, 0)
    assert int(result.steps) == 1
    np.testing.assert_array_equal(np.asarray(result.converged), [True, True])
    np.testing.assert_array_equal(np.asarray(result.rel_residual), [0.0, 0.0])


@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2)])
def test_map_output_cast_to_state_dtype(name, shape):
    # f computing in float32 for a float64 state: the solver keeps the state's dtype.
    def f(z):
        return ops.cast(0.5 * z + 1.0, "float32")

    result = solver(name)(f, ops.zeros(shape, "float64"), tol=1e-6)
    assert dtype_of(result.state) == "float64"
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), 2.0, atol=1e-5)


# ----------------------------------------------------- per_entry: batch_dims > 1
def _positions_map(batch=2, length=3, width=4):
    """f(z)[b, t] = tanh(z[b, t] W + x[b, t]): every position has its own fixed point.

    Also returns the same map on the `(batch * length, width)` matrix of positions."""
    w = matrix_with_norm(width, 0.5, seed=1)
    x = rng(2).standard_normal((batch, length, width))

    def f(z):
        return ops.tanh(ops.matmul(z, const(w, z)) + const(x, z))

    def on_rows(z):
        return ops.tanh(ops.matmul(z, const(w, z)) + const(x.reshape(-1, width), z))

    return f, on_rows


@pytest.mark.parametrize("run_as", ["eager", "compiled"])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_entry_solves_every_position_on_its_own(name, run_as):
    batch, length, width, tol = 2, 3, 4, 1e-5
    f, on_rows = _positions_map(batch, length, width)

    def solve(z0):
        return common.per_entry(lambda f, z0: solver(name)(f, z0, tol=tol), 2)(f, z0)

    if run_as == "compiled":
        solve = compiled(solve)
    result = solve(ops.zeros((batch, length, width)))
    assert tuple(result.state.shape) == (batch, length, width)
    assert_result_shapes(result, batch * length)
    assert np.all(np.asarray(result.converged))
    # Position (b, t) is sample b * length + t of one batch of positions (row-major), so
    # each has its own mixing, residual and first iterate that met tol; up to float32
    # rounding where compiled.
    rows = solver(name)(on_rows, ops.zeros((batch * length, width)), tol=tol)
    want = np.asarray(rows.state).reshape(batch, length, width)
    np.testing.assert_allclose(np.asarray(result.state), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.abs_residual), rows.abs_residual, atol=1e-6)


@pytest.mark.tensorflow_only("unknown static dimensions exist only in TensorFlow graphs")
def test_per_entry_with_unknown_static_shapes():
    import tensorflow as tf

    f, _ = _positions_map()
    per_entry = common.per_entry(lambda f, z0: solver("anderson")(f, z0, tol=1e-5), 2)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32)])
    def run(z0):
        return per_entry(f, z0)

    result = run(tf.zeros([2, 3, 4]))
    assert tuple(result.state.shape) == (2, 3, 4)
    assert tuple(result.converged.shape) == (6,)
    eager = per_entry(f, tf.zeros([2, 3, 4]))
    np.testing.assert_allclose(np.asarray(result.state), np.asarray(eager.state), atol=1e-6)
