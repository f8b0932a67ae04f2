"""`keras_deq.layers.Cell`: a cell that says its state's shape and start, consulted by `DEQ`."""

import keras
import numpy as np
import pytest
from keras import ops
from opteq_references import gradient

import keras_deq
from keras_deq import DEQ
from keras_deq.layers import (
    Cell,
    DenseCell,
    DEQTransformerCell,
    MultiscaleCell,
    OptEqCell,
    PositiveConcaveCell,
)


class HalfStep(Cell):
    """`z_next = (z + tanh(x)) / 2` from `z0 = x`: `z_k = x / 2^k + (1 - 1 / 2^k) tanh(x)`."""

    def initial_state(self, x, state_shape):
        return x

    def call(self, z, x):
        return 0.5 * (z + ops.tanh(x))


class PairCell(Cell):
    """A two-tensor injection `[a, b]`; the state has `b`'s shape and starts at `b`."""

    def state_shape(self, input_shape):
        return tuple(input_shape[1][1:])

    def initial_state(self, x, state_shape):
        return x[1]

    def call(self, z, x):
        return 0.5 * z + ops.sum(x[0], axis=-1, keepdims=True)


class DuckCell(keras.layers.Layer):
    """Not a `Cell`, but has its methods: `DEQ` consults them all the same."""

    def state_shape(self, input_shape):
        return (3,)

    def initial_state(self, x, state_shape):
        return ops.ones((ops.shape(x)[0], *state_shape))

    def call(self, z, x):
        return 0.5 * z + ops.mean(x, axis=-1, keepdims=True)

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


def test_cell_is_exported_and_the_library_cells_are_cells():
    assert keras_deq.Cell is Cell and keras_deq.layers.Cell is Cell
    for cls in (DenseCell, PositiveConcaveCell, MultiscaleCell, OptEqCell, DEQTransformerCell):
        assert issubclass(cls, Cell), cls
    config = keras.saving.serialize_keras_object(Cell(name="c"))
    assert config["registered_name"] == "keras_deq>Cell"
    assert isinstance(keras.saving.deserialize_keras_object(config), Cell)


def test_default_cell_is_the_deq_default():
    """A `Cell` that overrides nothing: the input's shape and a zero start, as for a Layer."""
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    cell = Cell()
    assert cell.state_shape((None, 4)) is None
    np.testing.assert_array_equal(np.asarray(cell.initial_state(x, None)), np.zeros((3, 4)))
    np.testing.assert_array_equal(np.asarray(cell.initial_state(x, (2,))), np.zeros((3, 2)))
    assert cell.compute_output_shape((None, 2), (None, 4)) == (None, 2)


def test_deq_takes_the_state_shape_and_start_from_the_cell():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 5)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")
    layer = DEQ(
        PairCell(), solver="fixed_point", max_iter=1, backward="unrolled", on_failure="ignore"
    )
    assert layer.compute_output_shape([(None, 5), (None, 3)]) == (None, 3)
    # One iteration measures the start's residual only: the start is returned.
    np.testing.assert_allclose(np.asarray(layer([a, b])), b, rtol=1e-6)
    # The call's `initial_state` and the layer's `state_shape` still come first.
    np.testing.assert_allclose(np.asarray(layer([a, b], initial_state=2 * b)), 2 * b, rtol=1e-6)
    converged = DEQ(PairCell(), solver="fixed_point", max_iter=100, tol=1e-6)([a, b])
    want = np.repeat(2 * a.sum(1, keepdims=True), 3, axis=1)
    np.testing.assert_allclose(np.asarray(converged), want, rtol=1e-5)
    with pytest.raises(ValueError, match="initial_state"):
        DEQ(PairCell(), state_shape=(4,))([a, b])  # (4,) overrides the cell's (3,)


def test_a_layer_with_the_methods_is_consulted_too():
    x = np.ones((2, 6), "float32")
    layer = DEQ(DuckCell(), solver="fixed_point", max_iter=1, on_failure="ignore")
    np.testing.assert_array_equal(np.asarray(layer(x)), np.ones((2, 3)))


def test_the_cell_start_is_differentiated_only_through_the_solve():
    """`Unrolled` differentiates `z0 = x`; the implicit gradient is the fixed point's."""
    x = ops.convert_to_tensor(np.linspace(-1.5, 1.5, 8, dtype="float32").reshape(2, 4))
    unrolled = DEQ(
        HalfStep(), "fixed_point", max_iter=3, tol=1e-12, backward="unrolled", on_failure="ignore"
    )
    implicit = DEQ(HalfStep(), solver="fixed_point", max_iter=60, tol=1e-7, on_failure="ignore")
    xs, t = np.asarray(x, "float64"), np.tanh(np.asarray(x, "float64"))
    # Three iterations return z_2 (the last iterate whose residual was measured).
    np.testing.assert_allclose(np.asarray(unrolled(x)), xs / 4 + 0.75 * t, rtol=1e-6)
    grad = gradient(lambda v: ops.sum(unrolled(v)), x)
    np.testing.assert_allclose(np.asarray(grad), 0.25 + 0.75 * (1 - t**2), rtol=1e-5)
    grad = gradient(lambda v: ops.sum(implicit(v, training=True)), x)
    np.testing.assert_allclose(np.asarray(grad), 1 - t**2, rtol=1e-4, atol=1e-6)


def test_bad_cell_state_shapes_and_starts_are_refused_naming_the_method():
    class BadShape(PairCell):
        def state_shape(self, input_shape):
            return (0,)

    class BadStart(PairCell):
        def initial_state(self, x, state_shape):
            return x[0]

    a, b = np.ones((2, 5), "float32"), np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match="state_shape"):
        DEQ(BadShape())([a, b])
    with pytest.raises(ValueError, match="BadStart.initial_state"):
        DEQ(BadStart())([a, b])


def test_multiscale_cell_gives_its_branch_shapes_to_a_plain_deq():
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype("float32")
    layer = DEQ(MultiscaleCell(channels=(4, 8), groups=2), max_iter=3, on_failure="ignore")
    z = layer(x)
    assert [tuple(t.shape) for t in z] == [(2, 8, 8, 4), (2, 4, 4, 8)]


def test_opteq_cell_starts_at_the_input():
    x = np.random.default_rng(3).normal(size=(3, 4)).astype("float32")
    layer = DEQ(OptEqCell([5]), solver="fixed_point", max_iter=1, on_failure="ignore")
    np.testing.assert_allclose(np.asarray(layer(x)), x, rtol=1e-6)
