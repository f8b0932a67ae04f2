"""A cell's non-trainable state (dropout seeds, batch statistics) is read once per `DEQ`
call and advanced once: every evaluation of one call sees the same map.

The reference is a cell whose state is a counter `c` that each call increments and that
scales the map, `f(z, x) = tanh(c * z W + x)`: if the state advanced inside the solve,
the map would change from one iteration to the next.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import DEQ


class CountingCell(keras.layers.Layer):
    """`tanh(c * z W + x)`; each call adds `increment` to the non-trainable `c`."""

    def __init__(self, increment=0.1, **kwargs):
        super().__init__(**kwargs)
        self.increment = increment

    def build(self, z_shape, x_shape):
        n = z_shape[-1]
        self.kernel = self.add_weight(
            shape=(n, n), initializer=keras.initializers.Orthogonal(0.6, seed=1), name="kernel"
        )
        self.c = self.add_weight(shape=(), initializer="ones", trainable=False, name="c")

    def call(self, z, x):
        out = ops.tanh(self.c * ops.matmul(z, self.kernel) + x)
        self.c.assign(self.c + self.increment)
        return out

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


def numpy_fixed_point(kernel, c, x, steps=200):
    z = np.zeros_like(x)
    for _ in range(steps):
        z = np.tanh(c * z @ kernel + x)
    return z


def make_deq(increment):
    return DEQ(CountingCell(increment), solver="anderson", max_iter=60, tol=1e-6)


def inputs(seed=0):
    return np.random.default_rng(seed).normal(size=(8, 6)).astype("float32") * 0.5


def test_one_call_solves_the_map_of_its_start_state_and_advances_it_once():
    deq = make_deq(increment=0.1)
    x = inputs()
    deq.build(x.shape)
    z = ops.convert_to_numpy(deq(x, training=True))
    kernel = ops.convert_to_numpy(deq.cell.kernel)
    np.testing.assert_allclose(z, numpy_fixed_point(kernel, 1.0, x), atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(deq.cell.c), 1.1, rtol=1e-6)

    z = ops.convert_to_numpy(deq(x, training=True))
    np.testing.assert_allclose(z, numpy_fixed_point(kernel, 1.1, x), atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(deq.cell.c), 1.2, rtol=1e-6)


def test_inference_leaves_the_state_alone():
    deq = make_deq(increment=0.1)
    x = inputs()
    deq(x, training=False)
    deq(x)
    np.testing.assert_allclose(ops.convert_to_numpy(deq.cell.c), 1.0)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "unrolled"])
def test_the_gradient_is_that_of_the_map_the_forward_solved(backward):
    """One SGD step of `fit` with the counting cell moves the weights exactly as with a
    cell whose state is held constant at the call's start value (same map)."""
    x, y = inputs(0), inputs(1)

    def one_step(increment):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                DEQ(CountingCell(increment), max_iter=60, tol=1e-6, backward=backward),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        return [ops.convert_to_numpy(w) for w in model.trainable_weights]

    advancing, constant = one_step(0.1), one_step(0.0)
    for a, b in zip(advancing, constant, strict=True):
        assert not np.allclose(a, keras.initializers.Orthogonal(0.6, seed=1)((6, 6)))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_dropout_cell_converges_and_draws_a_new_mask_each_step():
    """With `keras.layers.Dropout` in the cell every iteration of a solve uses one mask
    (the solve converges), and the next training call draws another."""

    class DropoutCell(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(
                16, kernel_initializer=keras.initializers.Orthogonal(0.5, seed=2)
            )
            self.dropout = keras.layers.Dropout(0.5, seed=3)

        def build(self, z_shape, x_shape):
            self.dense.build(z_shape)

        def call(self, z, x, training=None):
            return ops.tanh(self.dropout(self.dense(z), training=training) + x)

        def compute_output_shape(self, z_shape, x_shape):
            return z_shape

    deq = DEQ(DropoutCell(), max_iter=100, tol=1e-6)
    x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    first = ops.convert_to_numpy(deq(x, training=True))
    second = ops.convert_to_numpy(deq(x, training=True))
    assert deq.solver_statistics()["converged"] == 1.0
    assert not np.allclose(first, second)
    # Each output is the fixed point of its own (fixed-mask) map: one more step with
    # the mask of that call would not move it, which is what `converged` says; and
    # inference (no dropout) is deterministic.
    np.testing.assert_allclose(
        ops.convert_to_numpy(deq(x, training=False)), ops.convert_to_numpy(deq(x)), atol=1e-6
    )
