"""States of any structure: vectors, images, sequences, lists of tensors, dicts."""

import numpy as np
import pytest
import tensorflow as tf

from .helpers import SOLVER_NAMES, assert_result_shapes, flat, matrix_with_norm, rng, solver

TOL = 1e-9


class FlatTanh:
    """f(z) = tanh(flat(z) W + x), reshaped back to the structure of z: a 0.5-contraction
    that mixes every entry of every tensor of the state."""

    def __init__(self, example):
        self.example = example
        leaves = tf.nest.flatten(example)
        self.batch = leaves[0].shape[0]
        self.sizes = [int(np.prod(t.shape[1:])) for t in leaves]
        n = sum(self.sizes)
        self.w = matrix_with_norm(n, 0.5, seed=n)
        self.x = rng(n + 1).standard_normal((self.batch, n))

    def __call__(self, z):
        leaves = tf.nest.flatten(z)
        matrix = tf.concat([tf.reshape(t, [tf.shape(t)[0], -1]) for t in leaves], axis=1)
        out = tf.tanh(tf.matmul(matrix, tf.constant(self.w, matrix.dtype)) + self.x)
        parts = tf.split(out, self.sizes, axis=1)
        return tf.nest.pack_sequence_as(
            z, [tf.reshape(p, tf.shape(t)) for p, t in zip(parts, leaves, strict=True)]
        )

    def reference(self):
        z = np.zeros((self.batch, self.w.shape[0]))
        for _ in range(200):
            z = np.tanh(z @ self.w + self.x)
        return z


def _zeros(shapes, container):
    tensors = [tf.zeros(s, tf.float64) for s in shapes]
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


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_structure_in_structure_out(name, case):
    shapes, container = CASES[case]
    z0 = _zeros(shapes, container)
    f = FlatTanh(z0)
    result = solver(name)(f, z0, max_iter=100, tol=TOL)
    tf.nest.assert_same_structure(result.state, z0)
    assert type(result.state) is type(z0)
    for got, want in zip(tf.nest.flatten(result.state), tf.nest.flatten(z0), strict=True):
        assert got.shape == want.shape
        assert got.dtype == want.dtype
    assert_result_shapes(result, f.batch)
    assert bool(tf.reduce_all(result.converged))
    n = f.w.shape[0]
    err = np.linalg.norm(flat(result.state) - f.reference(), axis=1)
    assert np.all(err <= 2 * TOL * (np.sqrt(n) + 1))


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batch_sizes(name, batch):
    z0 = [tf.zeros([batch, 3, 2], tf.float64), tf.zeros([batch, 4], tf.float64)]
    f = FlatTanh(z0)
    result = solver(name)(f, z0, max_iter=100, tol=TOL)
    assert_result_shapes(result, batch)
    assert [t.shape for t in result.state] == [(batch, 3, 2), (batch, 4)]
    assert bool(tf.reduce_all(result.converged))
    err = np.linalg.norm(flat(result.state) - f.reference(), axis=1)
    assert np.all(err <= 2 * TOL * (np.sqrt(10) + 1))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_multiscale_parts_are_not_mixed_up(name):
    # Two scales with their own fixed points: a -> 0.5 a + 1 (a* = 2) and
    # b -> 0.5 b - 3 (b* = -6). Swapping or mis-splitting parts would show.
    def f(z):
        a, b = z
        return [0.5 * a + 1.0, 0.5 * b - 3.0]

    z0 = [tf.zeros([3, 2, 2, 1], tf.float64), tf.zeros([3, 5], tf.float64)]
    result = solver(name)(f, z0, max_iter=200, tol=1e-12)
    np.testing.assert_allclose(result.state[0].numpy(), 2.0, atol=1e-10)
    np.testing.assert_allclose(result.state[1].numpy(), -6.0, atol=1e-10)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_unknown_static_shapes_in_graph(name):
    spec = [
        tf.TensorSpec([None, None, 3], tf.float64),
        tf.TensorSpec([None, 5], tf.float64),
    ]

    @tf.function(input_signature=[spec])
    def run(z0):
        return solver(name)(lambda s: [0.5 * tf.tanh(s[0]) + 1.0, 0.5 * s[1] - 1.0], z0, tol=1e-10)

    result = run([tf.zeros([2, 4, 3], tf.float64), tf.zeros([2, 5], tf.float64)])
    assert [t.shape for t in result.state] == [(2, 4, 3), (2, 5)]
    assert bool(tf.reduce_all(result.converged))
    np.testing.assert_allclose(result.state[1].numpy(), -2.0, atol=1e-9)
    # the scalar equation a = 0.5 tanh(a) + 1
    a = 1.0
    for _ in range(200):
        a = 0.5 * np.tanh(a) + 1.0
    np.testing.assert_allclose(result.state[0].numpy(), a, atol=1e-9)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_numpy_initial_state(name):
    z0 = np.zeros((2, 3), np.float64)
    result = solver(name)(lambda z: 0.5 * z + 1.0, z0, tol=1e-10)
    assert result.state.dtype == tf.float64
    np.testing.assert_allclose(result.state.numpy(), 2.0, atol=1e-9)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2)])
def test_map_output_cast_to_state_dtype(name, shape):
    # f computing in float32 for a float64 state: the solver keeps the state's dtype.
    def f(z):
        return tf.cast(0.5 * z + 1.0, tf.float32)

    result = solver(name)(f, tf.zeros(shape, tf.float64), tol=1e-6)
    assert result.state.dtype == tf.float64
    assert bool(tf.reduce_all(result.converged))
    np.testing.assert_allclose(result.state.numpy(), 2.0, atol=1e-5)
