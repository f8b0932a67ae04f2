"""`keras_deq.solvers.result`: the loop's row sums, by reduction or by product."""

import numpy as np
import pytest
from keras import ops

from keras_deq import solvers
from keras_deq.solvers import result as res

from .helpers import compiled, rng


@pytest.mark.parametrize("products", [False, True])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_sums_match_numpy(products, mode, dtype):
    values = rng(3).standard_normal((7, 33)).astype(dtype)

    def sums(matrix):
        with res.row_sums_as_products(products):
            return res.row_sums(matrix)

    fn = sums if mode == "eager" else compiled(sums, xla=mode == "xla")
    got = ops.convert_to_numpy(fn(ops.convert_to_tensor(values)))
    # Keras computes in float32 on JAX whatever the dtype asked for.
    eps = np.finfo(got.dtype).eps
    np.testing.assert_allclose(got, values.sum(axis=1), rtol=0, atol=64 * eps * 33)


def test_row_sums_handle_an_empty_state():
    with res.row_sums_as_products(True):
        got = compiled(res.row_sums, xla=True)(ops.zeros((3, 0)))
    np.testing.assert_array_equal(ops.convert_to_numpy(got), np.zeros(3))


@pytest.mark.parametrize(
    ("shape", "expected"), [((4, 6), True), ((4, 2, 3), False), ([(4, 6), (4, 6)], False)]
)
def test_products_only_for_a_matrix_state(shape, expected):
    seen = []

    def f(z):
        seen.append(getattr(res._ROW_SUMS, "products", False))
        return [0.5 * t for t in z] if isinstance(z, list) else 0.5 * z

    z0 = [ops.ones(s) for s in shape] if isinstance(shape, list) else ops.ones(shape)
    solvers.FixedPoint(max_iter=3)(f, z0)
    assert seen and set(seen) == {expected}
    assert getattr(res._ROW_SUMS, "products", False) is False  # restored


def test_a_matrix_and_an_image_state_solve_alike_under_xla():
    """The same map on the same numbers, as a matrix (norms by product) and as an
    image (norms by reduction): the same iterations and residuals."""
    w = rng(5).standard_normal((12, 12)).astype("float32")
    w = 0.7 * w / np.linalg.norm(w, 2)
    x = rng(6).standard_normal((5, 12)).astype("float32")

    def matrix_map(z):
        return ops.tanh(ops.matmul(z, w) + x)

    def image_map(z):
        return ops.reshape(matrix_map(ops.reshape(z, (5, 12))), (5, 3, 4))

    solver = solvers.Anderson(max_iter=40, tol=1e-5)
    a = compiled(lambda: solver(matrix_map, ops.zeros((5, 12))), xla=True)()
    b = compiled(lambda: solver(image_map, ops.zeros((5, 3, 4))), xla=True)()
    assert int(a.steps) == int(b.steps)
    np.testing.assert_allclose(
        ops.convert_to_numpy(a.state), ops.convert_to_numpy(b.state).reshape(5, 12), atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(a.rel_residual), ops.convert_to_numpy(b.rel_residual), rtol=1e-3
    )
